"""pdllm eval and pdllm demo end to end on the tiny checkpoint (they run; the numbers are the toy model's job)."""

import json

from pdllm.cli import main


def test_eval_grid_and_ablations(llada_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(llada_dir), "--out", str(out), "--tasks", "passkey", "--lengths", "96,160",
                 "--depths", "0,1", "--n", "1", "--ablations", "top_k,chunk_bos", "--ablation-n", "1",
                 "--gen-length", "4", "--chunk-size", "32", "--top-k", "2"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["grid"]) == {"vanilla", "dual", "prefill"}
    cell = report["grid"]["prefill"]["passkey"]["160"]["1.0"]
    assert cell["n"] == 1 and 0.0 <= cell["accuracy"] <= 1.0
    assert [r["label"] for r in report["ablations"]["top_k"]] == ["k=1", "k=2", "k=4", "k=8", "k=16"]
    dense = report["ablations"]["dense"]  # the dense model on the ablation's own examples
    assert set(dense["tasks"]) == set(report["ablation_tasks"]) and 0 <= dense["accuracy"] <= 1
    assert (out / "heatmaps.png").stat().st_size > 0 and (out / "ablation_top_k.png").exists()


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
    assert main(["demo", "--model", str(llada_dir), "--questions", "1", "--context-tokens", "128",
                 "--chunk-size", "32", "--top-k", "2", "--gen-length", "4"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "prefill" in out and "vanilla" in out
