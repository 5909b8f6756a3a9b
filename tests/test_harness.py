"""pdllm eval and pdllm demo end to end on the tiny checkpoint (they run; the numbers are the toy model's job)."""

import json

from pdllm.cli import main


def test_eval_grid_and_ablations(llada_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(llada_dir), "--out", str(out), "--tasks", "passkey", "--lengths", "96,160",
                 "--depths", "0,1", "--n", "2", "--ablations", "top_k,chunk_bos", "--ablation-n", "1",
                 "--gen-length", "4", "--chunk-size", "32", "--top-k", "2"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["grid"]) == {"vanilla", "prefill", "prefill_no_bos"}
    cell = report["grid"]["prefill"]["passkey"]["160"]["1.0"]
    assert cell["n"] == 2 and 0.0 <= cell["accuracy"] <= 1.0 and len(cell["correct"]) == 2
    # recall@K, and every miss put down to the selection or to the model
    assert 0.0 <= cell["recall"] <= 1.0 and len(cell["needle_selected"]) == 2
    assert cell["misses_needle_selected"] + cell["misses_needle_not_selected"] == 2 - round(2 * cell["accuracy"])
    assert "recall" not in report["grid"]["vanilla"]["passkey"]["160"]["1.0"]
    row = report["summary"]["by_task_length"]["passkey"]["160"]
    assert row["prefill"]["n"] == 4 and len(row["prefill_minus_dense"]) == 3 and len(row["bos_minus_no_bos"]) == 3
    assert report["trained_length"] == 160 and any("trained length" in g["goal"] for g in report["goals"])
    assert [r["label"] for r in report["ablations"]["top_k"]] == ["k=1", "k=2", "k=4", "k=8", "k=16"]
    assert report["ablations"]["top_k"][-1]["recall"] == 1.0  # every chunk kept: the needle always is
    dense = report["ablations"]["dense"]  # the dense model on the ablation's own examples
    assert set(dense["tasks"]) == set(report["ablation_tasks"]) and 0 <= dense["accuracy"] <= 1
    for name in ("heatmaps", "lengths_recall_bos", "depth_curve", "ablations"):
        assert (out / f"{name}.png").stat().st_size > 0, name


def test_needle_chunk_recall_and_intervals():
    from pdllm.eval.metrics import needle_chunks, needle_recalled, paired_difference, wilson_interval

    assert needle_chunks((130, 140), 128) == [1] and needle_chunks((120, 140), 128) == [0, 1]
    assert needle_recalled((120, 140), 128, [0, 1, 5]) and not needle_recalled((120, 140), 128, [1, 5])
    lo, hi = wilson_interval(95, 100)
    assert 0.88 < lo < 0.95 < hi < 0.985
    assert wilson_interval(0, 0) == (0.0, 1.0)
    diff, lo, hi = paired_difference([True] * 10, [True] * 9 + [False])
    assert diff == 0.1 and lo < 0.1 < hi


def test_eval_on_longbench_files(llada_dir, tmp_path):
    from pathlib import Path
    fixtures = Path(__file__).parent / "fixtures" / "longbench"
    out = tmp_path / "lb"
    assert main(["eval", "--model", str(llada_dir), "--out", str(out), "--longbench", str(fixtures),
                 "--tasks", "narrativeqa", "--limit", "1", "--max-gen", "4", "--methods", "dual,prefill",
                 "--chunk-size", "32"]) == 0
    report = json.loads((out / "benchmark.json").read_text())
    assert report["results"]["prefill"]["narrativeqa"]["n"] == 1


def test_demo(llada_dir, capsys):
    assert main(["demo", "--model", str(llada_dir), "--questions", "1", "--context-tokens", "96,128",
                 "--chunk-size", "32", "--top-k", "2", "--gen-length", "4"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "prefill" in out and "vanilla" in out
