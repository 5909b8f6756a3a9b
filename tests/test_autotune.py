"""The tuned-config loader (nearest bucket, unknown GPU, corrupt files) and a smoke run of the tuner."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from pdllm.autotune import configs
from pdllm.notices import PdllmWarning
from pdllm.autotune.configs import ConfigError, bucket_distance, device_key, load_config_file, lookup, rescale_splits
from pdllm.testing import HAS_CUDA


def entry(kv_len, q_rows=32, head_dim=128, group=1, dtype="bfloat16", block_n=64, splits=4, base=32):
    return {
        "bucket": {"kv_len": kv_len, "q_rows": q_rows, "head_dim": head_dim, "group": group, "dtype": dtype},
        "config": {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 3, "num_splits": splits},
        "base_programs": base,
    }


@pytest.fixture(autouse=True)
def fresh_cache():
    configs.clear_cache()
    yield
    configs.clear_cache()


@pytest.fixture
def table_dir(tmp_path):
    data = {
        "device": "Fake GPU 80GB",
        "chunk_attention": [
            entry(1024, block_n=32, splits=1),
            entry(4096, block_n=64, splits=4),
            entry(65536, block_n=128, splits=16),
            entry(4096, head_dim=64, block_n=16, splits=2),
            entry(4096, dtype="float16", block_n=32, splits=8),
        ],
        "key_attention_mass": [
            {"bucket": entry(4096)["bucket"], "config": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2}},
        ],
    }
    (tmp_path / "Fake_GPU_80GB.json").write_text(json.dumps(data))
    return tmp_path


def get(kernel="chunk_attention", name="Fake GPU 80GB", directory=None, **shape):
    call = dict(kv_len=4096, q_rows=32, head_dim=128, group=1, dtype=torch.bfloat16)
    call.update(shape)
    return lookup(kernel, name, directory=directory, **call)


def test_device_key_like_vllm():
    assert device_key("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert device_key("NVIDIA GeForce RTX 4090/PCIe") == "NVIDIA_GeForce_RTX_4090_PCIe"


def test_nearest_bucket(table_dir):
    assert get(directory=table_dir)["BLOCK_N"] == 64  # exact
    assert get(directory=table_dir, kv_len=1500)["BLOCK_N"] == 32  # nearer 1024 than 4096 in log2
    assert get(directory=table_dir, kv_len=3000)["BLOCK_N"] == 64
    assert get(directory=table_dir, kv_len=200_000)["BLOCK_N"] == 128
    assert get(directory=table_dir, head_dim=64, kv_len=65536)["BLOCK_N"] == 16  # head_dim outweighs length
    assert get(directory=table_dir, dtype=torch.float16)["BLOCK_N"] == 32  # the fp16 bucket
    # fp16 at 64K: no fp16 bucket there, the bf16 one wins (dtype penalty 0.5 < 4 octaves)
    assert get(directory=table_dir, dtype=torch.float16, kv_len=65536)["BLOCK_N"] == 128
    cfg = get(directory=table_dir)
    assert cfg["num_splits"] == 4 and cfg["base_programs"] == 32
    mass = get("key_attention_mass", directory=table_dir, kv_len=100)
    assert mass == {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2}


def test_distance_is_log_scaled():
    b = entry(4096)["bucket"]
    assert bucket_distance(b, 8192, 32, 128, 1, torch.bfloat16) == pytest.approx(1.0)
    assert bucket_distance(b, 2048, 32, 128, 1, torch.bfloat16) == pytest.approx(1.0)
    assert bucket_distance(b, 4096, 1, 128, 1, torch.bfloat16) == pytest.approx(5.0)
    assert bucket_distance(b, 4096, 32, 128, 4, torch.float16) == pytest.approx(2.5)
    assert bucket_distance(b, 4096, 32, 64, 1, torch.bfloat16) == pytest.approx(configs.HEAD_DIM_PENALTY)


def test_rescale_splits():
    assert rescale_splits(4, 32, 32) == 4
    assert rescale_splits(4, 32, 128) == 1  # four times the programs already: one split
    assert rescale_splits(4, 32, 8) == 16
    assert rescale_splits(4, None, 8) == 4


def test_unknown_gpu_warns_once_and_falls_back(tmp_path):
    with pytest.warns(PdllmWarning, match="no tuned kernel configs for GPU 'Mystery_GPU'"):
        cfg = get(name="Mystery GPU", directory=tmp_path)
    assert cfg == configs.default_config("chunk_attention", 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert get(name="Mystery GPU", directory=tmp_path, kv_len=99) == cfg
        get("key_attention_mass", name="Mystery GPU", directory=tmp_path)


def test_env_var_selects_directory(table_dir, monkeypatch):
    monkeypatch.setenv("PDLLM_CONFIG_DIR", str(table_dir))
    assert get()["BLOCK_N"] == 64


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level must be an object"),
        ('{"device": "x"}', "holds no table"),
        ('{"chunk_attention": {"a": 1}}', "must be a list"),
        ('{"chunk_attention": [3]}', r"chunk_attention\[0\] must be an object"),
        ('{"chunk_attention": [{"bucket": {}}]}', "needs an object 'config'"),
        (json.dumps({"chunk_attention": [{**entry(64), "bucket": {"kv_len": 64}}]}), "missing 'q_rows'"),
        (json.dumps({"chunk_attention": [{**entry(64), "bucket": {**entry(64)["bucket"], "dtype": "int8"}}]}), "dtype must be"),
        (json.dumps({"chunk_attention": [entry(64, block_n=48)]}), "BLOCK_N must be a power of two"),
        (json.dumps({"chunk_attention": [entry(64, splits=0)]}), "num_splits must be"),
        (json.dumps({"chunk_attention": [{**entry(64), "config": {"BLOCK_N": 64}}]}), "missing 'num_warps'"),
        (json.dumps({"chunk_attention": [{**entry(64), "bucket": {**entry(64)["bucket"], "kv_len": "4K"}}]}), "kv_len must be a positive integer"),
    ],
)
def test_corrupt_file_names_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "Fake_GPU.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=problem) as info:
        load_config_file(path)
    assert str(path) in str(info.value)
    configs.clear_cache()
    with pytest.raises(ConfigError, match=str(path).replace("\\", "\\\\")):
        get(name="Fake GPU", directory=tmp_path)


def test_shipped_tables_are_valid():
    for path in sorted(configs.CONFIG_DIR.glob("*.json")):
        data = load_config_file(path)
        assert data.get("device_key") == path.stem, f"{path}: device_key must match the file name"
        assert {"torch", "triton", "date", "device"} <= data.keys()


def test_cpu_gets_defaults_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = configs.get_config("chunk_attention", "cpu", kv_len=10, q_rows=1, head_dim=64, group=1, dtype=torch.float32)
    assert cfg == configs.default_config("chunk_attention", 64)


def test_default_num_splits_fills_the_sms():
    from pdllm.triton_kernels.chunk_attention import default_num_splits

    # LLaDA-8B, 32 query rows: 32 programs per split on 132 SMs -> one wave of 4 splits at 4K keys
    assert default_num_splits(32, 4196, 64, 132) == 4
    assert default_num_splits(32, 4196, 128, 132) == 4
    assert default_num_splits(8, 65536, 64, 132) == 16
    assert default_num_splits(32, 256, 64, 132) == 1  # too few tiles to split
    assert default_num_splits(1024, 65536, 64, 132) == 1  # the grid is full already
    assert default_num_splits(1, 1 << 20, 64, 132) == 64  # capped


def test_explicit_config_beats_table():
    from pdllm.triton_kernels.chunk_attention import launch_config

    q = torch.randn(1, 4, 8, 64)
    cfg = launch_config(q, 2, 1000, config={"BLOCK_N": 32, "num_warps": 2, "num_stages": 1}, num_splits=5)
    assert (cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"], cfg["num_splits"]) == (32, 2, 1, 5)
    assert launch_config(q, 2, 40, num_splits=50)["num_splits"] == 1  # never more splits than tiles


def test_only_the_tables_split_count_is_rescaled_to_the_calls_programs(monkeypatch):
    """A table entry tuned at 32 programs per split, met by a call of 8 (GQA 4: 8 KV heads, one block
    of 128 query rows): its 4 splits become 16, so the launch keeps its program count. A count the
    caller gives (the tuner's candidate, a test's) is launched as given."""
    from pdllm.triton_kernels import chunk_attention
    from pdllm.triton_kernels.chunk_attention import launch_config

    tuned = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "num_splits": 4, "base_programs": 32}
    monkeypatch.setattr(chunk_attention, "get_config", lambda *args, **kwargs: dict(tuned))  # where it is looked up
    q = torch.randn(1, 32, 32, 128)
    assert launch_config(q, 8, 65536)["num_splits"] == 16
    assert launch_config(q, 8, 65536, num_splits=2)["num_splits"] == 2
    assert launch_config(q, 8, 65536, config={"num_splits": 3})["num_splits"] == 3


def test_tuner_smoke_run_writes_a_loadable_table(tmp_path, capsys):
    """A tiny sweep in the interpreter (or natively on a GPU): every step of the real one."""
    from pdllm.autotune.tune import main

    device = "cuda" if HAS_CUDA else "cpu"
    argv = ["--device", device, "--kv-lens", "40", "--q-rows", "2", "--head-dims", "16", "--groups", "2",
            "--dtypes", "float32", "--block-n", "16,32", "--num-warps", "2", "--num-stages", "1",
            "--num-splits", "1,2", "--heads", "2", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = load_config_file(files[0])
    assert {"torch", "triton", "date", "device", "device_key"} <= data.keys()
    (e,) = data["chunk_attention"]
    assert e["bucket"] == {"kv_len": 40, "q_rows": 2, "head_dim": 16, "group": 2, "dtype": "float32"}
    assert e["config"]["BLOCK_N"] in (16, 32) and e["config"]["num_splits"] in (1, 2)
    assert len(data["key_attention_mass"]) == 1
    # a second run merges rather than duplicates
    assert main(argv + ["--kernels", "key_attention_mass"]) == 0
    data = load_config_file(files[0])
    assert len(data["chunk_attention"]) == 1 and len(data["key_attention_mass"]) == 1


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU message")
def test_tuner_without_gpu_says_so(capsys):
    from pdllm.cli import main

    assert main(["tune"]) == 2
    assert capsys.readouterr().err == ("pdllm: error: no CUDA GPU here; nothing to tune (--device cpu runs a smoke "
                                       "test in the Triton interpreter)\n")


def test_tuner_exits_non_zero_and_writes_nothing_when_nothing_was_tuned(tmp_path, capsys, monkeypatch):
    from pdllm.autotune import tune

    monkeypatch.setattr(tune, "TUNERS", {k: (lambda *a: (None, [{"why": "0 active drivers"}])) for k in tune.TUNERS})
    args = tune.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    assert tune.sweep(args, tune.environment("cpu"), tmp_path / "cpu.json") == 1
    assert "nothing was tuned" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_cpu_smoke_tune_runs_in_its_own_process_and_leaves_this_one_as_it_was(tmp_path, monkeypatch, capfd):
    """From a process not in the Triton interpreter (a GPU's), --device cpu tunes in a child that is:
    setting TRITON_INTERPRET here would put this process's later Triton and torch.compile work in
    the interpreter too."""
    from pdllm.autotune import tune

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = tune.main(["--device", "cpu", "--out", str(tmp_path), "--kernels", "key_attention_mass"])
    assert "TRITON_INTERPRET" not in os.environ
    out = capfd.readouterr().out
    if code == 1 and "InterpreterError" in out:  # e.g. Triton 3.6's interpreter under NumPy >= 2.4
        pytest.skip("this Triton's interpreter cannot run the kernels: " + out.split("'why': ")[1][:120])
    assert code == 0 and "wrote" in out and len(load_config_file(tmp_path / "cpu.json")["key_attention_mass"]) == 1


def test_tuner_writes_to_the_user_directory_the_lookup_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("PDLLM_CONFIG_DIR", str(tmp_path / "mine"))
    assert configs.user_config_dir() == tmp_path / "mine" and configs.config_dirs()[0] == tmp_path / "mine"
    assert configs.config_dirs()[-1] == configs.CONFIG_DIR  # the shipped tables come last
    monkeypatch.delenv("PDLLM_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert configs.user_config_dir() == tmp_path / "xdg" / "pdllm" / "autotune"
    from pdllm.autotune.tune import parse_args
    assert parse_args(["--device", "cpu"]).out_dir is None  # main() then writes to user_config_dir()


def test_undecodable_table_is_a_config_error(tmp_path):
    bad = tmp_path / "NVIDIA_X.json"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match="not a JSON text file"):
        load_config_file(bad)
