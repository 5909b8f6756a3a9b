"""Tuned launch configurations: JSON data per GPU, looked up at run time.

Files: ``<device_key>.json``, looked up first in the user's directory (``$PDLLM_CONFIG_DIR`` if
set, else ``$XDG_CONFIG_HOME/pdllm/autotune``, i.e. ``~/.config/pdllm/autotune``), where ``pdllm
tune`` writes by default, then in the tables shipped with the package (``autotune/configs/``,
installed as ``pdllm.autotune/configs``; the tuner writes there only when told to with --out).
``device_key`` is the CUDA device name with every character
that is not a letter, digit, '.', '-' or '_' replaced by '_' (like vLLM's tuned MoE configs):
"NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3".

File format (every key is checked on load; a problem raises ConfigError naming the file)::

    {"device": "NVIDIA H100 80GB HBM3", "device_key": "NVIDIA_H100_80GB_HBM3",
     "torch": "...", "triton": "...", "date": "...", ...free-form metadata...,
     "chunk_attention": [
        {"bucket": {"kv_len": 4096, "q_rows": 32, "head_dim": 128, "group": 1, "dtype": "bfloat16"},
         "config": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "num_splits": 4},
         "base_programs": 32, ...measurements...},
        ...],
     "key_attention_mass": [ same, config without num_splits ]}

Nearest bucket. A call is described by the same five numbers as a bucket; the distance is

    |log2 kv_len - log2 kv_len'| + |log2 q_rows - log2 q_rows'| + |log2 group - log2 group'|
      + 0.5 if the dtypes differ (fp16 and bf16 kernels behave alike)
      + 8   if head_dim differs  (a different tile shape: only used when nothing else exists)

so lengths count by ratio: 8K is as far from 4K as from 16K. Ties go to the earlier entry.

num_splits is tuned for the bucket's ``base_programs`` (programs of one split: batch x KV heads
x query blocks). When a call has a different base, ``rescale_splits`` keeps the total program
count that won the tuning. A config without num_splits uses the kernel's SM-filling heuristic.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch

from pdllm.notices import PdllmWarning

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KERNELS = ("chunk_attention", "key_attention_mass")
BUCKET_KEYS = ("kv_len", "q_rows", "head_dim", "group")
DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

DTYPE_PENALTY = 0.5
HEAD_DIM_PENALTY = 8.0


class ConfigError(ValueError):
    """A tuned-config file that cannot be used; the message names the file and the problem."""


def default_config(kernel: str, head_dim: int = 128) -> dict:
    """Sane launch parameters for a GPU without a tuned table (num_splits: heuristic)."""
    if kernel == "chunk_attention":
        return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3 if head_dim <= 128 else 2, "num_splits": None}
    if kernel == "key_attention_mass":
        return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    raise KeyError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")


def device_key(name: str) -> str:
    """Normalise a device name for a file name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.strip())


def user_config_dir() -> Path:
    """Where the tuner writes and the lookup reads first: $PDLLM_CONFIG_DIR, else ~/.config/pdllm/autotune."""
    if os.environ.get("PDLLM_CONFIG_DIR"):
        return Path(os.environ["PDLLM_CONFIG_DIR"])
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "pdllm" / "autotune"


def config_dirs() -> tuple[Path, ...]:
    """The directories the lookup reads, in order: the user's, then the shipped tables."""
    return (user_config_dir(), CONFIG_DIR)


def _lookup_dirs() -> tuple[str, ...]:
    """config_dirs() as strings, remembered per value of the variables it reads: the lookup is on
    the launch path of every eager kernel call, and building the paths costs more than the rest."""
    return _dirs_for(os.environ.get("PDLLM_CONFIG_DIR"), os.environ.get("XDG_CONFIG_HOME"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=8)
def _dirs_for(config_dir, xdg_config_home, home) -> tuple[str, ...]:  # the arguments are the cache's key
    return tuple(map(str, config_dirs()))


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def _is_pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def _check_int(path, where, value, ok, want):
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ConfigError(f"{path}: {where} must be {want}, got {value!r}")


def _validate_entry(path, kernel, i, entry):
    where = f"{kernel}[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: {where} must be an object, got {type(entry).__name__}")
    for key in ("bucket", "config"):
        if not isinstance(entry.get(key), dict):
            raise ConfigError(f"{path}: {where} needs an object '{key}'")
    bucket, cfg = entry["bucket"], entry["config"]
    for key in BUCKET_KEYS:
        if key not in bucket:
            raise ConfigError(f"{path}: {where}.bucket is missing '{key}'")
        _check_int(path, f"{where}.bucket.{key}", bucket[key], lambda v: v > 0, "a positive integer")
    if bucket.get("dtype") not in DTYPE_NAMES:
        raise ConfigError(f"{path}: {where}.bucket.dtype must be one of {sorted(DTYPE_NAMES)}, got {bucket.get('dtype')!r}")
    for key in ("BLOCK_N", "num_warps", "num_stages"):
        if key not in cfg:
            raise ConfigError(f"{path}: {where}.config is missing '{key}'")
    _check_int(path, f"{where}.config.BLOCK_N", cfg["BLOCK_N"], lambda v: _is_pow2(v) and v >= 16, "a power of two >= 16")
    _check_int(path, f"{where}.config.num_warps", cfg["num_warps"], lambda v: _is_pow2(v) and v <= 32, "a power of two <= 32")
    _check_int(path, f"{where}.config.num_stages", cfg["num_stages"], lambda v: 1 <= v <= 8, "an integer in 1..8")
    if cfg.get("num_splits") is not None:
        _check_int(path, f"{where}.config.num_splits", cfg["num_splits"], lambda v: v >= 1, "a positive integer or null")
    if entry.get("base_programs") is not None:
        _check_int(path, f"{where}.base_programs", entry["base_programs"], lambda v: v >= 1, "a positive integer or null")


def load_config_file(path) -> dict:
    """Read and check one tuned-config file. Raises ConfigError(file: problem)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a JSON text file (undecodable byte at {e.start}); delete it and tune "
                          "again") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be an object, got {type(data).__name__}")
    if not any(k in data for k in KERNELS):
        raise ConfigError(f"{path}: holds no table: expected one of the keys {list(KERNELS)}")
    for kernel in KERNELS:
        entries = data.get(kernel, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: '{kernel}' must be a list of entries, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            _validate_entry(path, kernel, i, entry)
    return data


_warned: set[str] = set()


@functools.lru_cache(maxsize=None)
def _table(key: str, directories: tuple[str, ...]):
    paths = [Path(d) / f"{key}.json" for d in directories]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"pdllm: no tuned kernel configs for GPU '{key}' (looked for {' and '.join(map(str, paths))}); "
                "using defaults. Run `pdllm tune` to tune for it.",
                PdllmWarning,
                stacklevel=5,
            )
        return None
    return load_config_file(path)


def clear_cache():
    """Forget loaded tables and given warnings (tests; after writing a new file)."""
    _table.cache_clear()
    _nearest_in_table.cache_clear()
    _warned.clear()
    _device_name.cache_clear()
    _dirs_for.cache_clear()


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


# ---------------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------------


def _log2(x) -> float:
    return math.log2(max(x, 1))


def bucket_distance(bucket: dict, kv_len: int, q_rows: int, head_dim: int, group: int, dtype: torch.dtype) -> float:
    """Distance between a call and a bucket (see the module docstring)."""
    d = abs(_log2(kv_len) - _log2(bucket["kv_len"]))
    d += abs(_log2(q_rows) - _log2(bucket["q_rows"]))
    d += abs(_log2(group) - _log2(bucket["group"]))
    if DTYPE_NAMES[bucket["dtype"]] != dtype:
        d += DTYPE_PENALTY
    if bucket["head_dim"] != head_dim:
        d += HEAD_DIM_PENALTY
    return d


def nearest_entry(entries: list, kv_len: int, q_rows: int, head_dim: int, group: int, dtype: torch.dtype):
    """The entry whose bucket is nearest (first one on ties), or None for an empty table."""
    best, best_d = None, math.inf
    for entry in entries:
        d = bucket_distance(entry["bucket"], kv_len, q_rows, head_dim, group, dtype)
        if d < best_d:
            best, best_d = entry, d
    return best


def get_config(kernel: str, device, *, kv_len: int, q_rows: int, head_dim: int, group: int, dtype: torch.dtype) -> dict:
    """Launch config for ``kernel`` on ``device`` for a call of this shape.

    CUDA: the nearest bucket of this GPU's table (``lookup``). Anything else (the Triton
    interpreter on CPU): defaults, silently.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return default_config(kernel, head_dim)
    return lookup(kernel, _device_name(device), kv_len=kv_len, q_rows=q_rows, head_dim=head_dim, group=group, dtype=dtype)


def lookup(kernel: str, device_name: str, *, kv_len: int, q_rows: int, head_dim: int, group: int, dtype: torch.dtype,
           directory=None) -> dict:
    """Config of the nearest bucket in ``<directory>/<device_key(device_name)>.json`` (default: config_dirs()).

    An unknown GPU (no file) warns once and gets ``default_config``; an ill-formed file raises
    ConfigError. The result holds BLOCK_N, num_warps, num_stages, and for chunk_attention
    num_splits (None: use the kernel's heuristic) and base_programs (see ``rescale_splits``).
    """
    cfg = default_config(kernel, head_dim)
    directories = (str(directory),) if directory is not None else _lookup_dirs()
    entry = _nearest_in_table(kernel, device_key(device_name), directories, kv_len, q_rows, head_dim, group, dtype)
    if entry is not None:
        cfg.update(entry["config"])
        if kernel == "chunk_attention":
            cfg["base_programs"] = entry.get("base_programs")
    return cfg


@functools.lru_cache(maxsize=4096)
def _nearest_in_table(kernel, key, directories, kv_len, q_rows, head_dim, group, dtype):
    """The nearest entry of a table (None: no table, or no entry for the kernel), remembered: a
    model asks for the same few shapes at every layer and step, and this lookup is on the launch
    path of every eager call."""
    table = _table(key, directories)
    return None if table is None else nearest_entry(table.get(kernel, []), kv_len, q_rows, head_dim, group, dtype)


def rescale_splits(num_splits: int, tuned_base: int | None, base: int) -> int:
    """Keep the tuned total program count (num_splits * tuned_base) for a call whose base differs."""
    if not tuned_base or tuned_base == base:
        return num_splits
    return max(1, round(num_splits * tuned_base / max(base, 1)))
