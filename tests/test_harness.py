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
    from pdllm.eval.metrics import needle_cut, needle_recalled, paired_difference, wilson_interval
    from pdllm.prefill import Span

    fixed = [Span(s, s + 128, True) for s in range(0, 768, 128)]
    assert not needle_cut((130, 140), fixed) and needle_cut((120, 140), fixed)
    assert needle_recalled((120, 140), [fixed[i] for i in (0, 1, 5)])
    assert not needle_recalled((120, 140), [fixed[i] for i in (1, 5)])
    official = [Span(0, 127, True), Span(128, 255, True)]  # bos_in_chunk: token 127 is in no chunk
    assert needle_cut((120, 130), official) and not needle_recalled((120, 130), official)
    overlapping = [Span(0, 160), Span(96, 288)]  # a needle a boundary cuts in one chunk is whole in another
    assert not needle_cut((120, 140), overlapping) and needle_recalled((120, 140), overlapping[1:])
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


def test_eval_prefill_flags_are_prefill_config_fields(llada_dir, tmp_path, monkeypatch):
    """Every PrefillConfig field is a `pdllm eval` flag (derived as `pdllm generate` derives them); a
    flag left out keeps DEFAULT_PREFILL, a flag given reaches the prefill methods' PrefillConfig."""
    import pytest

    from pdllm.eval import harness
    from pdllm.methods import make_method
    from pdllm.prefill import PrefillConfig

    flags = {k.flag for k in harness.eval_prefill_knobs()}
    assert flags == {"--" + f.name.replace("_", "-") for f, _ in PrefillConfig.knob_fields()} - {"--chunk-parallel"}

    class Captured(Exception):
        pass

    seen = {}

    def capture(model, tok, tasks, lengths, depths, n, methods, gen, batch_size, prefill, *rest, **kw):
        seen["prefill"] = prefill
        seen["config"] = make_method("prefill", **prefill).cfg  # what run_examples builds from these knobs
        raise Captured  # the knobs are what this test is about, not a grid

    monkeypatch.setattr(harness, "run_grid", capture)
    with pytest.raises(Captured):
        main(["eval", "--model", str(llada_dir), "--out", str(tmp_path / "out"), "--score-depth", "2",
              "--no-chunk-bos", "--token-capacity", "none", "--cache-mode", "chunk_query"])
    assert seen["prefill"] == {**harness.DEFAULT_PREFILL, "score_depth": 2, "chunk_bos": False, "token_capacity": None,
                               "cache_mode": "chunk_query"}
    cfg = seen["config"]
    assert (cfg.score_depth, cfg.chunk_bos, cfg.cache_mode) == (2, False, "chunk_query")
    assert (cfg.chunk_size, cfg.top_k, cfg.score_batch) == (128, 4, 64)  # DEFAULT_PREFILL, as before the flags were derived


def test_eval_bad_prefill_flag_is_one_line_before_the_model_loads(llada_dir, tmp_path, monkeypatch, capsys):
    import pdllm.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(pdllm.loading, "load_model", no_load)
    out = tmp_path / "out"
    e = ["eval", "--model", str(llada_dir), "--out", str(out)]
    for argv, message in ((["--score-depth", "0"], "invalid prefill config: score_depth=0 must be >= 1"),
                          (["--chunk-size", "0"], "invalid prefill config: chunk_size=0 must be >= 1"),
                          (["--top-k", "0"], "top_k=0 must be >= 1"),
                          (["--score-depth", "two"], "pdllm eval: argument --score-depth: invalid int value: 'two'"),
                          (["--cache-mode", "paged"], "argument --cache-mode: invalid choice 'paged'"),
                          (["--chunk-parallel"], "unrecognized arguments: --chunk-parallel")):
        assert main(e + argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("pdllm: error: "), err
        assert message in lines[0], lines[0]
    assert not out.exists()


def test_benchmark_runs_take_the_grid_labels(llada_dir):
    """--longbench/--infinitebench accept the grid's labels: prefill_no_bos is prefill with chunk_bos off."""
    from pdllm.eval.examples import BenchmarkExample
    from pdllm.eval.harness import DEFAULT_PREFILL, run_benchmark
    from pdllm.loading import load_model

    model, tok = load_model(llada_dir, "cpu")
    ex = BenchmarkExample(id="0", task="qa", prefix="Read. ", context="alpha beta gamma delta " * 20,
                          question="Which word?", answers=["alpha"], all_classes=None, max_new_tokens=4,
                          metric_name="qa_f1_score")
    prefill = {**DEFAULT_PREFILL, "chunk_size": 32, "top_k": 2}
    for label in ("prefill", "prefill_no_bos"):
        result = run_benchmark(model, tok, [ex], label, prefill, max_gen=4)
        assert result["qa"]["n"] == 1 and 0.0 <= result["qa"]["score"] <= 1.0


def test_the_boundary_remedies_benchmark_runs(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_boundaries

    report = bench_boundaries.main(["--smoke", "--device", "cpu", "--methods", "dense", "snapped", "--out",
                                    str(tmp_path / "b.json")])
    cell = report["cells"]["512"]["passkey"]["random_depths"]
    assert cell["snapped"]["cut"]["n"] + cell["snapped"]["whole"]["n"] == cell["snapped"]["n"] == 2
    assert len(cell["snapped"]["minus_dense"]) == 3 and (tmp_path / "b.json").exists()
