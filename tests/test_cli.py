"""The pdllm command end to end on the tiny checkpoint, and every bad input: exit status 2, one line
`pdllm: error: ...` on stderr naming the problem and the fix, no traceback (run in-process)."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from pdllm import sampler
from pdllm.notices import PdllmWarning
from pdllm.cli import main
from pdllm.testing import HAS_CUDA


def test_generate_plain_prompt(llada_dir, capsys):
    assert main(["generate", "--model", str(llada_dir), "--prompt", "what is the pass key", "--gen-length", "8",
                 "--block-length", "4", "--steps", "8", "--method", "vanilla"]) == 0
    out, err = capsys.readouterr()
    assert "[vanilla]" in err and "nfe 8" in err and out.strip() != ""


@pytest.mark.parametrize("extra", [[], ["--visual"], ["--threshold", "0.5", "--score", "draft", "--token-capacity", "5"],
                                   ["--no-chunk-bos", "--score-depth", "1", "--score-layers", "1", "--no-cuda-graphs"]])
def test_generate_long_context_with_prefill(llada_dir, tmp_path, capsys, extra):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    assert main(["generate", "--model", str(llada_dir), "--context-file", str(ctx), "--question", "what is the pass key",
                 "--gen-length", "8", "--block-length", "8", "--steps", "8", "--method", "prefill",
                 "--chunk-size", "16", "--top-k", "2", *extra]) == 0
    err = capsys.readouterr().err
    assert "[prefill]" in err and "selected chunks" in err
    if "--visual" in extra:
        assert "block 0 step" in err and "◀ selected" in err


def test_generate_dream_checkpoint(dream_dir, capsys):
    assert main(["generate", "--model", str(dream_dir), "--prompt", "hello", "--gen-length", "4", "--block-length", "4",
                 "--steps", "4"]) == 0


@pytest.mark.parametrize("method, knobs", [("dllm_cache", ["--prompt-interval", "2", "--rho", "0.5"]),
                                           ("dyllm", ["--num-full-steps", "1", "--tau", "0.9"]),
                                           ("dual", ["--refresh-every", "2"])])
def test_every_method_knob_is_a_flag(llada_dir, capsys, method, knobs):
    assert main(["generate", "--model", str(llada_dir), "--prompt", "hello", "--gen-length", "4", "--block-length", "4",
                 "--steps", "4", "--method", method, *knobs]) == 0


def test_flags_are_derived_from_the_configs():
    """Every field of GenerationConfig and PrefillConfig, and every method keyword, is one flag."""
    import dataclasses

    from pdllm.cli import build_parser
    from pdllm.methods import METHODS
    from pdllm.prefill import PrefillConfig
    from pdllm.sampler import GenerationConfig

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {s for a in generate._actions for s in a.option_strings}
    for f in [*dataclasses.fields(GenerationConfig), *(f for f, _ in PrefillConfig.knob_fields())]:
        assert "--" + f.name.replace("_", "-") in flags, f.name
    for cls in METHODS.values():
        for name in ("prompt_interval", "rho", "tau", "num_full_steps", "refresh_every"):
            if name in cls.__init__.__code__.co_varnames:
                assert "--" + name.replace("_", "-") in flags
    method = next(a for a in generate._actions if "--method" in a.option_strings)
    assert tuple(method.choices) == tuple(METHODS)


def test_a_new_stage_knob_gets_a_flag():
    import dataclasses

    from pdllm.knobs import all_method_knobs
    from pdllm.methods import METHODS
    from pdllm.prefill import SELECTORS, Stage

    @dataclasses.dataclass(frozen=True)
    class Newest(Stage):
        name = "newest_test_only"
        new_knob: int | None = None

    SELECTORS.register(Newest)
    try:
        knob = all_method_knobs(METHODS)["new_knob"]
        assert (knob.flag, knob.type, knob.optional, knob.methods) == ("--new-knob", int, True, ["prefill"])
        assert "newest_test_only" in all_method_knobs(METHODS)["selection"].choices
    finally:
        SELECTORS.unregister("newest_test_only")
    assert "new_knob" not in all_method_knobs(METHODS)


# ---- every bad input: one line, exit 2 -------------------------------------------------------------


def fails(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pdllm: error: "), err
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ckpt(llada_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(llada_dir, d)
    return d


def _edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _gen(model, *extra):
    return ["generate", "--model", str(model), "--prompt", "q", "--gen-length", "4", "--block-length", "4",
            "--steps", "4", *extra]


def test_checkpoint_problems(ckpt, tmp_path, capsys):
    fails(capsys, _gen(tmp_path / "none"), "does not exist")
    index = ckpt / "model.safetensors.index.json"
    shard = "model-00001-of-00002.safetensors"
    (tmp_path / "x.safetensors").write_bytes((ckpt / shard).read_bytes())
    _edit_json(index, lambda i: {**i, "weight_map": {k: ("../x.safetensors" if v == shard else v)
                                                     for k, v in i["weight_map"].items()}})
    fails(capsys, _gen(ckpt), "'../x.safetensors' points outside the checkpoint directory")
    _edit_json(index, lambda i: {**i, "weight_map": list(i["weight_map"])})
    fails(capsys, _gen(ckpt), "needs a 'weight_map' object")


def test_named_pipe_is_refused_not_opened(ckpt, capsys):
    shard = ckpt / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    fails(capsys, _gen(ckpt), "is not a regular file")


@pytest.mark.parametrize("edit, message", [
    (lambda hf: [hf], "holds a JSON list, not an object of model settings"),
    (lambda hf: {**hf, "max_sequence_length": 0}, "config.json: invalid model config: max_sequence_length=0 must be a positive integer"),
    (lambda hf: {**hf, "bos_token_id": 5000}, "bos_token_id=5000 is outside the vocabulary (size 320)"),
    (lambda hf: {**hf, "mask_token_id": 7}, "config.json mask_token_id=7 but the tokenizer's mask token <|mdm_mask|> is id 2"),
    (lambda hf: {**hf, "embedding_size": 200, "vocab_size": 200}, "tokenizer.json has 300 tokens but the model's vocabulary is 200"),
])
def test_config_problems(ckpt, capsys, edit, message):
    _edit_json(ckpt / "config.json", edit)
    fails(capsys, _gen(ckpt), message)


def test_weight_problems(ckpt, capsys):
    from safetensors.torch import load_file, save_file
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.transformer.ln_f.weight"
    home = ckpt / index[key]
    other = next(p for p in ckpt.glob("model-*.safetensors") if p != home)
    t = load_file(str(other))
    save_file({**t, key: torch.ones(64)}, str(other))
    fails(capsys, _gen(ckpt), f"holds '{key}', which the index assigns to {home.name}")
    save_file(t, str(other))
    h = load_file(str(home))
    h[key][0] = float("nan")
    save_file(h, str(home))
    fails(capsys, _gen(ckpt), f"{key} holds NaN or Inf values")


@pytest.mark.parametrize("extra, message", [
    (["--gen-length", "8", "--steps", "7"], "steps=7 must be a positive multiple of the number of blocks (2)"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--threshold", "2"], "threshold=2.0 must be in (0, 1]"),
    (["--remasking", "best"], "argument --remasking: invalid choice 'best'"),
    (["--method", "fast"], "argument --method: invalid choice: 'fast'"),
    (["--tau", "0.9"], "--tau is a knob of --method dyllm; it does nothing with --method dual"),
    (["--method", "dyllm", "--tau", "2"], "tau=2.0 must be in (0, 1]"),
    (["--dtype", "int8"], "dtype 'int8' is not one of float32, bfloat16, float16"),
    (["--device", "gpu"], "device 'gpu' is not a torch device name"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--preset", "official"], "--preset official is a preset of --method prefill; use it with --method prefill"),
])
def test_knobs_are_checked_before_the_model_loads(llada_dir, capsys, monkeypatch, extra, message):
    import pdllm.cli

    def never(*a, **k):
        raise AssertionError("the model was loaded before the knobs were checked")
    monkeypatch.setattr(pdllm.cli, "load_model", never)
    fails(capsys, _gen(llada_dir, *extra), message)


def test_prefill_knobs_are_checked_before_the_model_loads(llada_dir, tmp_path, capsys, monkeypatch):
    import pdllm.cli
    monkeypatch.setattr(pdllm.cli, "load_model", lambda *a, **k: pytest.fail("loaded"))
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("some context")
    base = ["generate", "--model", str(llada_dir), "--context-file", str(ctx), "--question", "q", "--method", "prefill"]
    fails(capsys, base + ["--top-k", "0"], "top_k=0 must be >= 1")
    fails(capsys, base + ["--score-depth", "0"], "score_depth=0 must be >= 1")
    fails(capsys, base + ["--score", "magic"], "argument --score: invalid choice 'magic' (choose from attention, cascade, draft)")


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU message")
def test_cuda_on_a_cpu_machine(llada_dir, capsys):
    fails(capsys, _gen(llada_dir, "--device", "cuda"), "device 'cuda': this machine has no CUDA GPU")


def test_prompt_and_file_problems(llada_dir, tmp_path, capsys):
    m = ["generate", "--model", str(llada_dir)]
    fails(capsys, m, "give --prompt TEXT, --prompt-file F, or --context-file F with --question Q")
    fails(capsys, m + ["--question", "q"], "--context-file and --question go together")
    fails(capsys, m + ["--prompt", "q", "--method", "prefill"], "--method prefill needs --context-file and --question")
    fails(capsys, m + ["--prompt", "  "], "the prompt is empty")
    fails(capsys, m + ["--prompt-file", str(tmp_path / "nope.txt")], f"--prompt-file {tmp_path / 'nope.txt'}: no such file")
    binary = tmp_path / "ctx.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    fails(capsys, m + ["--context-file", str(binary), "--question", "q"], f"--context-file {binary}: not UTF-8 text")
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("some context")
    fails(capsys, m + ["--context-file", str(ctx), "--question", " "], "--question is empty")
    fails(capsys, m + ["--context-file", str(tmp_path), "--question", "q"], "is not a regular file")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from pdllm.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="does not exist"):
        main(_gen(tmp_path / "none", "--debug"))
    monkeypatch.setenv("PDLLM_DEBUG", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        main(_gen(tmp_path / "none"))


def test_a_real_process_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pdllm.cli", "generate", "--model", str(tmp_path / "none"), "--prompt",
                        "q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"pdllm: error: checkpoint directory {tmp_path / 'none'} does not exist\n"


# ---- warnings: once, one line ----------------------------------------------------------------------


def test_steps_beyond_gen_length_and_context_beyond_trained_positions_warn_once(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sampler, "_warned", set())
    _edit_json(ckpt / "config.json", lambda hf: {**hf, "max_sequence_length": 32})
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("the quick brown fox jumps over the lazy dog. " * 4)
    argv = ["generate", "--model", str(ckpt), "--context-file", str(ctx), "--question", "what is the pass key",
            "--gen-length", "8", "--block-length", "8", "--steps", "16", "--method", "vanilla"]
    assert main(argv) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    warned = [line for line in err.splitlines() if line.startswith("pdllm: warning:")]
    assert warned[0] == ("pdllm: warning: steps=16 is more than gen_length=8: a step unmasks at least one token, so "
                         "decoding takes 8 steps (set steps <= gen_length)")
    assert warned[1].startswith("pdllm: warning: vanilla places this request's tokens at ") and "more than the 32 positions the model was trained" \
        in warned[1] and len(warned) == 2
    assert main(argv) == 0
    assert "pdllm: warning:" not in capsys.readouterr().err  # once per process


def test_only_pdllm_warnings_are_pdllm_lines(monkeypatch, capsys):
    """A warning of torch's (or any library's) during a command is shown as Python shows warnings,
    never dressed as pdllm's; a PdllmWarning is the one-line ``pdllm: warning:``."""
    import pdllm.demo

    others = []

    def python_shows(message, category, *rest):  # stands for Python's own showwarning
        others.append((category, str(message)))

    monkeypatch.setattr(warnings, "showwarning", python_shows)

    def command(rest):
        warnings.warn("`torch.jit.script_method` is deprecated", DeprecationWarning)
        warnings.warn("pdllm: steps=16 is more than gen_length=8", PdllmWarning)
        return 0

    monkeypatch.setattr(pdllm.demo, "main", command)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["demo"]) == 0
        assert warnings.showwarning is python_shows  # the command leaves Python's as it found it
    assert capsys.readouterr().err == "pdllm: warning: steps=16 is more than gen_length=8\n"
    assert others == [(DeprecationWarning, "`torch.jit.script_method` is deprecated")]


# ---- pdllm eval / demo / tune ----------------------------------------------------------------------


def test_eval_argument_problems_come_before_anything_is_written(llada_dir, tmp_path, capsys):
    out = tmp_path / "out"
    e = ["eval", "--model", str(llada_dir), "--out", str(out)]
    data = tmp_path / "bench"
    data.mkdir()
    fails(capsys, e + ["--longbench", str(data), "--infinitebench", str(data)],
          "give --longbench DIR or --infinitebench DIR, not both")
    fails(capsys, e + ["--longbench", str(data), "--limit", "0"], "--limit 0: give at least 1 example per task")
    fails(capsys, e + ["--longbench", str(tmp_path / "missing")], f"--longbench {tmp_path / 'missing'}: no such directory")
    fails(capsys, e + ["--limit", "3"], "--limit applies to --longbench/--infinitebench runs")
    fails(capsys, e + ["--methods", "vanilla,fast"], "--methods: unknown fast; choose from vanilla, prefix, dual")
    fails(capsys, e + ["--lengths", "256,many"], "--lengths '256,many': give comma-separated int values")
    fails(capsys, e + ["--n", "0"], "--n 0: must be >= 1")
    fails(capsys, e + ["--bogus"], "pdllm eval: unrecognized arguments: --bogus")
    assert not out.exists()


def test_demo_and_tune_problems(tmp_path, capsys):
    fails(capsys, ["demo", "--model", str(tmp_path)], f"no model at {tmp_path}")
    fails(capsys, ["demo", "--questions", "x"], "argument --questions: invalid int value: 'x'")
    (tmp_path / "cpu.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    fails(capsys, ["tune", "--device", "cpu", "--out", str(tmp_path)], "cpu.json: not a JSON text file")
    fails(capsys, ["tune", "--device", "cpu", "--kernels", "matmul"], "--kernels: unknown kernel 'matmul'")
    fails(capsys, ["tune", "--device", "cpu", "--kv-lens", "0"], "--kv-lens '0': give comma-separated positive integers")


def test_generate_under_torchrun_without_chunk_parallel_warns_once(llada_dir, tmp_path, capsys, monkeypatch):
    """WORLD_SIZE > 1 (torchrun's environment) with no --chunk-parallel: every rank would do the whole
    job, so the command says so, once. No process group is started: distributed.init is stubbed."""
    import torch.distributed as dist

    from pdllm import distributed

    monkeypatch.setattr(sampler, "_warned", set())
    monkeypatch.setattr(distributed, "init", lambda *args, **kwargs: False)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("the quick brown fox jumps over the lazy dog. " * 6)
    base = ["generate", "--model", str(llada_dir), "--context-file", str(ctx), "--question", "what is the pass key",
            "--gen-length", "4", "--block-length", "4", "--steps", "4"]

    def warnings_of(argv, world):
        monkeypatch.setenv("WORLD_SIZE", world)
        assert main(argv) == 0
        err = capsys.readouterr().err.replace("\r", "\n")
        return [line for line in err.splitlines() if line.startswith("pdllm: warning:")]

    prefill = [*base, "--method", "prefill", "--chunk-size", "16", "--top-k", "2"]
    assert warnings_of([*base, "--method", "vanilla"], "1") == []  # a world of one: nothing to share
    assert warnings_of([*prefill, "--chunk-parallel"], "2") == []  # the scoring is shared
    warned = warnings_of([*base, "--method", "vanilla"], "2")
    assert warned == ["pdllm: warning: started by torchrun with WORLD_SIZE=2 but without --chunk-parallel: each of "
                      "the 2 ranks does the whole job; add --method prefill --chunk-parallel to share the chunk "
                      "scoring across them, or run one process"]
    assert warnings_of(prefill, "2") == []  # once per process
    monkeypatch.setattr(sampler, "_warned", set())
    # prefill without --chunk-parallel scores every chunk on every rank (another world size: another message,
    # which Python's own once-per-location filter lets through)
    assert warnings_of(prefill, "3") == [warned[0].replace("=2", "=3").replace("the 2 ranks", "the 3 ranks")]
    assert not dist.is_initialized()
