"""Fuzz of the checkpoint loader (model.from_pretrained): every corruption of a valid sharded
checkpoint ends in a CheckpointError, in bounded time, or loads exactly the original tensors.

Corruptions: truncated files, byte flips in a safetensors header, a rewritten header field (dtype,
shape, offsets, header length), edited index entries, tensors dropped / added / duplicated /
reshaped / retyped / made non-finite, config.json edits, links out of the directory, named pipes,
directories and devices in place of files. A corruption that points the loader outside the directory
or at a non-regular file must be refused even where the bytes there are fine. Opening a named pipe
blocks (holding the GIL, inside safetensors), so a helper process opens every pipe for writing after
UNBLOCK_S: a load that took that long opened one, and fails the test instead of hanging it. PDLLM_FUZZ_EXAMPLES=1000 (per kind) for a long run.
"""

import json
import os
import shlex
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from pdllm.checkpoint import CheckpointError, from_pretrained

TIME_LIMIT_S = 10.0  # a tiny checkpoint loads in ~10 ms; this only has to catch a hang
UNBLOCK_S = 2.0  # after this, the helper process releases a loader blocked on a named pipe
INDEX = "model.safetensors.index.json"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
FILES = [*SHARDS, INDEX, "config.json"]


@pytest.fixture(scope="module")
def original(llada_dir):
    """The valid checkpoint and its tensors as loaded (the answer every successful load must give)."""
    return llada_dir, {n: p.detach().clone() for n, p in from_pretrained(llada_dir, torch.float32).state_dict().items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    n, _ = _header(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


# ---- corruptions: each is (name, draw -> function(ckpt_dir, outside_dir)) ------------------------

@st.composite
def truncate(draw):
    name, keep = draw(st.sampled_from(FILES)), draw(st.floats(0, 1, exclude_max=True))

    def apply(d, _):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:int(keep * len(data))])
    return apply


@st.composite
def flip_header_byte(draw):
    name, pos, bit = draw(st.sampled_from(SHARDS)), draw(st.integers(0, 10**6)), draw(st.integers(0, 7))

    def apply(d, _):
        data = bytearray((d / name).read_bytes())
        n, _h = _header(bytes(data))
        i = pos % (8 + n)
        data[i] ^= 1 << bit
        (d / name).write_bytes(bytes(data))
    return apply


DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F64", "I64", "U64", "F8_E4M3", "F8_E5M2",
          "XX", ""]


@st.composite
def edit_header_field(draw):
    name = draw(st.sampled_from(SHARDS))
    which = draw(st.sampled_from(["dtype", "shape", "offsets", "length"]))
    value = draw({"dtype": st.sampled_from(DTYPES),
                  "shape": st.lists(st.integers(-2, 300), max_size=4),
                  "offsets": st.lists(st.integers(-2, 10**7), min_size=0, max_size=3),
                  "length": st.integers(0, 2**64 - 1)}[which])
    pick = draw(st.integers(0, 10**6))

    def apply(d, _):
        data = (d / name).read_bytes()
        _n, header = _header(data)
        keys = sorted(k for k in header if k != "__metadata__")
        key = keys[pick % len(keys)]
        if which == "length":
            (d / name).write_bytes(struct.pack("<Q", value) + data[8:])
            return
        field = {"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[which]
        header[key][field] = value
        (d / name).write_bytes(_with_header(data, header))
    return apply


ENTRY_VALUES = ["../outside.safetensors", "/etc/passwd", "/dev/zero", "", ".", "..", "fifo", "nope.safetensors",
                "sub/../" + SHARDS[0], "config.json", INDEX, 5, None, ["x"], {"a": 1}, *SHARDS]


@st.composite
def edit_index(draw):
    action = draw(st.sampled_from(["set", "drop", "add", "weight_map", "document"]))
    pick, value = draw(st.integers(0, 10**6)), draw(st.sampled_from(ENTRY_VALUES))
    other = draw(st.sampled_from([[], ["a"], "x", 3, None, {"weight_map": []}]))

    def apply(d, outside):
        index = json.loads((d / INDEX).read_text())
        keys = sorted(index["weight_map"])
        key = keys[pick % len(keys)]
        if value == "../outside.safetensors":
            shutil.copy(d / index["weight_map"][key], outside / "outside.safetensors")
        if value == "fifo":
            os.mkfifo(d / "fifo")
        outside_or_pipe = action in ("set", "add") and value in ("../outside.safetensors", "/etc/passwd", "/dev/zero",
                                                                  "fifo")
        if action == "set":
            index["weight_map"][key] = value
        elif action == "drop":
            del index["weight_map"][key]
        elif action == "add":
            index["weight_map"]["model.transformer.extra.weight"] = value
        elif action == "weight_map":
            index["weight_map"] = other
        else:
            index = other
        (d / INDEX).write_text(json.dumps(index))
        return outside_or_pipe  # must be refused
    return apply


@st.composite
def edit_tensors(draw):
    name = draw(st.sampled_from(SHARDS))
    action = draw(st.sampled_from(["drop", "extra", "duplicate", "reshape", "retype", "nonfinite", "wrong_shard"]))
    pick, where = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
    bad = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    dtype = draw(st.sampled_from([torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]))

    def apply(d, _):
        tensors = load_file(str(d / name))
        other_name = SHARDS[1 - SHARDS.index(name)]
        others = load_file(str(d / other_name))
        key = sorted(tensors)[pick % len(tensors)]
        t = tensors[key]
        if action == "drop":
            del tensors[key]
        elif action == "extra":
            tensors["model.transformer.extra.weight"] = t.clone()
        elif action == "duplicate":  # the same tensor in the other shard, with other values
            others[key] = t + 1
            save_file(others, str(d / other_name))
        elif action == "reshape":
            tensors[key] = t.flatten()[: max(1, t.numel() - 1 - where % t.numel())].clone()
        elif action == "retype":
            tensors[key] = t.to(dtype)
        elif action == "nonfinite":
            t.view(-1)[where % t.numel()] = bad
        else:  # a tensor the index assigns to the other shard, moved here
            moved = sorted(others)[where % len(others)]
            tensors[moved] = others.pop(moved)
            save_file(others, str(d / other_name))
        save_file(tensors, str(d / name))
    return apply


CONFIG_EDITS = [("max_sequence_length", 0), ("max_sequence_length", -1), ("bos_token_id", 10**6),
                ("eos_token_id", -3), ("mask_token_id", 320), ("d_model", "64"), ("n_layers", 3), ("d_model", 32),
                ("embedding_size", 10), ("n_heads", 0), ("rope_theta", "x"), ("rms_norm_eps", None),
                ("mask_token_id", 2.5), ("model_type", "gpt2"), ("layer_norm_type", "layer")]


@st.composite
def edit_config(draw):
    key, value = draw(st.sampled_from(CONFIG_EDITS))
    as_list = draw(st.booleans()) and draw(st.booleans())

    def apply(d, _):
        hf = json.loads((d / "config.json").read_text())
        hf[key] = value
        (d / "config.json").write_text(json.dumps([hf] if as_list else hf))
    return apply


@st.composite
def replace_file(draw):
    name = draw(st.sampled_from(FILES))
    kind = draw(st.sampled_from(["fifo", "directory", "link_out", "link_dev", "dangling", "link_fifo"]))

    def apply(d, outside):
        f = d / name
        shutil.copy(f, outside / name)
        f.unlink()
        if kind == "fifo":
            os.mkfifo(f)
        elif kind == "directory":
            f.mkdir()
        elif kind == "link_out":  # the same bytes, but outside the directory: still refused
            f.symlink_to(outside / name)
        elif kind == "link_dev":
            f.symlink_to("/dev/zero")
        elif kind == "dangling":
            f.symlink_to(d / "no-such-file")
        else:
            os.mkfifo(d / "pipe")
            f.symlink_to(d / "pipe")
        return True  # every one of these must be refused
    return apply


CORRUPTIONS = {"truncate": truncate(), "flip_header_byte": flip_header_byte(), "edit_header_field": edit_header_field(),
               "edit_index": edit_index(), "edit_tensors": edit_tensors(), "edit_config": edit_config(),
               "replace_file": replace_file()}


def _load_with_time_limit(path):
    """from_pretrained in a thread: (model or None, exception or None); fails if it does not return,
    or if it returned only because the helper process released a named pipe it had opened."""
    result = {}
    pipes = [p for p in path.parent.rglob("*") if p.is_fifo() and not p.is_symlink()]
    helper = None
    if pipes:  # `: > pipe` opens it for writing: that returns only once a reader (the loader) opened it
        script = f"sleep {UNBLOCK_S}; " + " ".join(f"( : > {shlex.quote(str(p))} ) & " for p in pipes) + "wait"
        helper = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    start = time.monotonic()

    def target():
        try:
            result["model"] = from_pretrained(path, torch.float32)
        except BaseException as e:  # noqa: BLE001 - reported below, whatever it is
            result["error"] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIME_LIMIT_S)
    elapsed = time.monotonic() - start
    if helper is not None:
        os.killpg(helper.pid, 9)
        helper.wait()
    assert not thread.is_alive(), f"the loader did not return within {TIME_LIMIT_S}s (blocked on a file?)"
    assert not (pipes and elapsed >= UNBLOCK_S), f"the loader opened a named pipe (blocked {elapsed:.1f}s)"
    return result.get("model"), result.get("error")


@pytest.mark.parametrize("kind", CORRUPTIONS)
@settings(max_examples=int(os.environ.get("PDLLM_FUZZ_EXAMPLES", 20)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_corruption_is_a_checkpoint_error_or_changes_nothing(original, workdir, kind, data):
    corruption = data.draw(CORRUPTIONS[kind], label=kind)
    src, tensors = original
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        d, outside = root / "ckpt", root / "outside"
        shutil.copytree(src, d)
        outside.mkdir()
        must_fail = corruption(d, outside)
        model, error = _load_with_time_limit(d)
        assert error is not None or not must_fail, "loaded through a file outside the directory or not regular"
        if error is not None:
            assert isinstance(error, CheckpointError), f"{type(error).__name__}: {error}"
            assert str(error) and "\n" not in str(error)
            return
        loaded = model.state_dict()  # it loaded: then it must be exactly the original checkpoint
        assert loaded.keys() == tensors.keys()
        for name, t in tensors.items():
            assert torch.equal(loaded[name], t), f"{name} changed but the checkpoint loaded"
    finally:
        shutil.rmtree(root, ignore_errors=True)
