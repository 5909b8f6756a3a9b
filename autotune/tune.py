"""Sweep launch parameters of the chunk-attention kernels and write this GPU's config file.

    pdllm tune                                     # the default grid (long: ~an hour on an H100)
    pdllm tune --kv-lens 4096 --q-rows 32 --head-dims 128 --groups 1 --dtypes bfloat16
    pdllm tune --device cpu                        # a smoke run of every step in the Triton interpreter
                                                   # (in a child process: see in_interpreter_process)

For every shape bucket (context length of the selected KV, query rows, head_dim, GQA ratio, dtype)
it builds a realistic problem (one batch row, about 32 query heads, the selected keys are
1024-row chunks in random order out of a pool twice as large), then

  chunk_attention:    stage 1 sweeps BLOCK_N x num_warps x num_stages with the SM-filling split
                      heuristic, stage 2 sweeps num_splits for the three fastest tile shapes;
  key_attention_mass: sweeps BLOCK_N x num_warps x num_stages.

Each candidate is first checked against the reference of pdllm.attention with the tolerance of
pdllm.testing (a candidate that fails to compile or disagrees is dropped and reported), then
timed with triton.testing.do_bench_cudagraph (median; launches replayed from a CUDA graph, as
the model's decode steps are, so that host launch overhead does not decide between configs). As in
the model, where consecutive attention calls read different layers, one timed call runs the kernel
on each of several copies of the pool, enough that their selected K/V is 4x the L2 cache: a
bucket that fits in L2 would otherwise rank configs by how well they use L2 hits, which the model
never sees (and would favour configs with too few loads in flight). The winners go to
``<--out>/<device_key>.json``, by default in the user's config directory that the lookup reads
first (pdllm.autotune.configs.user_config_dir: $PDLLM_CONFIG_DIR or ~/.config/pdllm/autotune;
never the installed package), merged with the buckets already there, together with the device,
driver, torch and triton versions and the date. ``--budget-s`` stops starting new buckets after
that many seconds, so a sweep always ends with a valid file.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pdllm.autotune.configs import DTYPE_NAMES, device_key, load_config_file, user_config_dir
from pdllm.environment import environment as pdllm_environment

TOTAL_HEADS = 32  # query heads of the tuning problems: Hkv = max(1, heads // group)
TOP_TILES = 3  # tile shapes (BLOCK_N, warps, stages) whose split count is swept
CHUNK = 1024


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


# --device cpu with the default grid: this one (the interpreter runs the default grid for days).
SMOKE_GRID = dict(kv_lens="40", q_rows="2", head_dims="16", groups="2", dtypes="float32", block_n="16,32",
                  num_warps="2", num_stages="1", num_splits="1,2", heads=2)


def parse_args(argv=None):
    import argparse

    from pdllm.cli import ArgumentParser

    p = ArgumentParser(prog="pdllm tune", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="chunk_attention,key_attention_mass")
    p.add_argument("--kv-lens", default="1024,4096,16384,65536", help="context lengths of the selected KV")
    p.add_argument("--q-rows", default="32,1,128", help="query rows per head (Tq)")
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--groups", default="1,4,7", help="GQA ratios H / Hkv")
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--num-warps", default="4,8")
    p.add_argument("--num-stages", default="2,3,4")
    p.add_argument("--num-splits", default="1,2,4,8,16,32")
    p.add_argument("--heads", type=int, default=TOTAL_HEADS, help="about this many query heads (Hkv = heads // group)")
    p.add_argument("--rep-ms", type=float, default=25.0)
    p.add_argument("--budget-s", type=float, default=None, help="start no new bucket after this many seconds")
    p.add_argument("--out", "--out-dir", dest="out_dir", type=Path, default=None,
                   help="directory of the table (default: $PDLLM_CONFIG_DIR or ~/.config/pdllm/autotune, read first "
                   "by the lookup)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda, or cpu for a smoke run in the Triton interpreter (a tiny grid unless one is given)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        for key, value in SMOKE_GRID.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def in_interpreter_process(argv: list[str]) -> int:
    """--device cpu from a process that is not in the Triton interpreter: the sweep runs in a child
    process that is. Triton reads TRITON_INTERPRET when it compiles, so setting it here would leave
    this process's later Triton work (the kernels, torch.compile's code) in the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "pdllm.cli", "tune", *argv], env=env).returncode


# ---------------------------------------------------------------------------------------------
# Problems, checking, timing
# ---------------------------------------------------------------------------------------------


def pool_copies(kv_len, hkv, head_dim, dtype, device) -> int:
    """Copies of the pool (like layers of a model) whose selected K/V together are >= 4x the L2
    cache, at most 8: timed back to back, no call finds the previous call's K/V in L2."""
    if device != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    selected = 2 * kv_len * hkv * head_dim * dtype.itemsize
    return max(1, min(8, math.ceil(4 * l2 / selected)))


def make_problem(kv_len, q_rows, head_dim, group, dtype, device, heads=TOTAL_HEADS, seed=0):
    """One batch row; the selected keys are CHUNK-row chunks (random order) of a 2x larger pool.
    Returns q, k_pools, v_pools, index, kv_len with pools (copies, Hkv, pool rows, D), laid out
    like ChunkKVCache's."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hkv = max(1, heads // group)
    H = hkv * group
    pool = 2 * kv_len
    chunk = min(CHUNK, kv_len)
    n_chunks = pool // chunk
    chunks = torch.randperm(n_chunks, generator=g)[: math.ceil(kv_len / chunk)]
    index = (chunks[:, None] * chunk + torch.arange(chunk)).flatten()[:kv_len].to(torch.int32)[None]
    q = torch.randn(1, H, q_rows, head_dim, generator=g).to(dtype)
    k_pool = torch.randn(pool, hkv, head_dim, generator=g).to(dtype)
    v_pool = torch.randn(pool, hkv, head_dim, generator=g).to(dtype)
    kv_len_t = torch.tensor([kv_len], dtype=torch.int32)
    q, k_pool, v_pool, index, kv_len_t = [t.to(device) for t in (q, k_pool, v_pool, index.contiguous(), kv_len_t)]
    copies = pool_copies(kv_len, hkv, head_dim, dtype, device)

    def layers(pool_rows):  # (copies, Hkv, P, D) views of row-major storage, as ChunkKVCache keeps its pool
        return pool_rows.expand(copies, -1, -1, -1).clone().transpose(1, 2)

    return q, layers(k_pool), layers(v_pool), index, kv_len_t


def bench(fn, copies, device, rep_ms) -> float:
    """Median milliseconds per call of fn(copy), over calls on each copy in turn: CUDA-graph
    replays on a GPU, a host clock in the interpreter. (do_bench's launch-by-launch timing is
    host-bound below ~16K keys: it cannot rank configs.)"""
    def every_copy():
        for i in range(copies):
            fn(i)

    if device == "cuda":
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(every_copy, rep=rep_ms, return_mode="median") / copies
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        every_copy()
        times.append((time.perf_counter() - t0) * 1e3 / copies)
    return sorted(times)[1]


def _close(actual, expected, dtype) -> str | None:
    from pdllm.testing import assert_close

    try:
        assert_close(actual, expected, dtype=dtype)
    except AssertionError as e:
        return str(e).splitlines()[0] if str(e) else "mismatch"
    return None


def _try(fn, copies, check, device, args):
    """(ms, None) for a candidate fn(copy) that runs and agrees with the reference on copy 0,
    else (None, why)."""
    try:
        result = fn(0)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # out of shared memory, compile errors: the candidate is dropped
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    why = check(result)
    if why:
        return None, why
    return bench(fn, copies, device, args.rep_ms), None


def _ranked(configs, run):
    """Time every candidate (run(cfg) -> (ms, why rejected or None)). Returns the valid ones as
    [(ms, cfg)], fastest first, and the rejected ones."""
    timed, rejected = [], []
    for cfg in configs:
        ms, why = run(cfg)
        if why:
            rejected.append({"config": cfg, "why": why})
        else:
            timed.append((ms, cfg))
    timed.sort(key=lambda t: t[0])
    return timed, rejected


def tune_chunk_attention(problem, args, device, log):
    from pdllm.attention import chunk_attention_reference
    from pdllm.triton_kernels.chunk_attention import (block_m_for, bytes_moved, chunk_attention, default_num_splits,
                                                      num_sms)
    import triton

    q, k_pools, v_pools, index, kv_len = problem
    k_pool, v_pool = k_pools[0], v_pools[0]
    B, H, Tq, D = q.shape
    hkv = k_pool.shape[0]
    L = index.shape[1]
    base = B * hkv * triton.cdiv((H // hkv) * Tq, block_m_for((H // hkv) * Tq))
    ref_out, ref_lse = chunk_attention_reference(q, k_pool, v_pool, index, kv_len)

    def check(result):
        out, lse = result
        return _close(out, ref_out, q.dtype) or _close(lse, ref_lse, torch.float32)

    def run(cfg):
        return _try(lambda i: chunk_attention(q, k_pools[i], v_pools[i], index, kv_len, config=cfg),
                    len(k_pools), check, device, args)

    tiles = [{"BLOCK_N": bn, "num_warps": nw, "num_stages": ns,
              "num_splits": default_num_splits(base, L, bn, num_sms(q.device))}
             for bn, nw, ns in itertools.product(_ints(args.block_n), _ints(args.num_warps), _ints(args.num_stages))]
    timed, rejected = _ranked(tiles, run)
    if not timed:
        return None, rejected
    heuristic_ms = timed[0][0]
    # Then the split count, for the TOP_TILES best tile shapes: a tile shape's rank can change with
    # the split count (a larger tile may leave fewer programs per SM room, or fewer tiles per split).
    splits = [dict(cfg, num_splits=s) for _, cfg in timed[:TOP_TILES] for s in _ints(args.num_splits)
              if s != cfg["num_splits"] and s <= triton.cdiv(L, cfg["BLOCK_N"])]
    more_timed, more_rejected = _ranked(splits, run)
    rejected += more_rejected
    best_ms, best = min(timed + more_timed, key=lambda t: t[0])
    nbytes = bytes_moved(q, k_pool, index)
    entry = {
        "config": best,
        "base_programs": base,
        "time_us": round(best_ms * 1e3, 2),
        "heuristic_splits_time_us": round(heuristic_ms * 1e3, 2),
        "gbps": round(nbytes / (best_ms * 1e-3) / 1e9, 1),
        "problem": {"batch": B, "heads": H, "kv_heads": hkv, "pool_rows": k_pool.shape[1]},
    }
    return entry, rejected


def tune_key_attention_mass(problem, args, device, log):
    from pdllm.attention import chunk_attention_reference, key_attention_mass_reference
    from pdllm.triton_kernels.attention_mass import key_attention_mass

    q, k_pools, v_pools, index, kv_len = problem
    k_pool = k_pools[0]
    lse = chunk_attention_reference(q, k_pool, v_pools[0], index, kv_len)[1]
    ref = key_attention_mass_reference(q, k_pool, index, kv_len, lse)
    configs = [{"BLOCK_N": bn, "num_warps": nw, "num_stages": ns}
               for bn, nw, ns in itertools.product(_ints(args.block_n), _ints(args.num_warps), _ints(args.num_stages))]
    timed, rejected = _ranked(configs, lambda cfg: _try(
        lambda i: key_attention_mass(q, k_pools[i], index, kv_len, lse, config=cfg), len(k_pools),
        lambda m: _close(m, ref, q.dtype), device, args))
    if not timed:
        return None, rejected
    best_ms, best = timed[0]
    return {"config": best, "time_us": round(best_ms * 1e3, 2)}, rejected


TUNERS = {"chunk_attention": tune_chunk_attention, "key_attention_mass": tune_key_attention_mass}


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------


def environment(device: str) -> dict:
    """pdllm.environment's record, plus the config table's device key."""
    env = pdllm_environment()
    if device == "cuda":
        env["device_key"] = device_key(env["device"])
    else:
        env.update(device="triton-interpreter", device_key="cpu", sm_count=None, memory_gib=None, driver=None)
    return env


def _same_bucket(a, b):
    return all(a[k] == b[k] for k in ("kv_len", "q_rows", "head_dim", "group", "dtype"))


def write_table(path: Path, env: dict, results: dict, grid: dict):
    """Merge new entries into the file (same bucket: replaced), keep it sorted, write atomically."""
    data = load_config_file(path) if path.exists() else {}
    data.update(env)
    grids = data.get("grid") if isinstance(data.get("grid"), dict) else {}
    for kernel in results:  # the sweep's arguments, per kernel (tuned in separate runs, maybe)
        grids[kernel] = grid
    data["grid"] = grids
    for kernel, entries in results.items():
        old = [e for e in data.get(kernel, []) if not any(_same_bucket(e["bucket"], n["bucket"]) for n in entries)]
        merged = old + entries
        merged.sort(key=lambda e: tuple(e["bucket"][k] for k in ("dtype", "head_dim", "group", "q_rows", "kv_len")))
        data[kernel] = merged
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    load_config_file(path)  # what we wrote must load


def main(argv=None) -> int:
    """The tuner; errors are UsageError / ConfigError (``pdllm tune`` prints them as one line).
    Returns 1 when every candidate of every bucket failed (nothing written)."""
    from pdllm.cli import UsageError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA GPU here; nothing to tune (--device cpu runs a smoke test in the Triton interpreter)")
    kernels = [k for k in args.kernels.split(",") if k]
    for k in kernels:
        if k not in TUNERS:
            raise UsageError(f"--kernels: unknown kernel {k!r}; choose from {', '.join(sorted(TUNERS))}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DTYPE_NAMES:
            raise UsageError(f"--dtypes: unknown dtype {d!r}; choose from {', '.join(sorted(DTYPE_NAMES))}")
    for flag in ("kv_lens", "q_rows", "head_dims", "groups", "block_n", "num_warps", "num_stages", "num_splits"):
        try:
            if not _ints(getattr(args, flag)) or min(_ints(getattr(args, flag))) < 1:
                raise ValueError
        except ValueError:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: give comma-separated positive "
                             "integers") from None
    env = environment(device)
    path = (args.out_dir or user_config_dir()) / f"{env['device_key']}.json"
    if path.exists():
        load_config_file(path)  # a bad file fails now, not after the sweep
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return in_interpreter_process(argv)
    return sweep(args, env, path)


def sweep(args, env: dict, path: Path) -> int:
    """Tune every bucket of the grid into the table at ``path``, written after each bucket;
    returns 1 when nothing was tuned (and nothing written)."""
    device = args.device
    kernels = [k for k in args.kernels.split(",") if k]
    dtypes = [d for d in args.dtypes.split(",") if d]
    grid = {k: getattr(args, k) for k in ("kv_lens", "q_rows", "head_dims", "groups", "dtypes", "block_n",
                                         "num_warps", "num_stages", "num_splits", "heads", "rep_ms")}
    results = {k: [] for k in kernels}
    start = time.time()
    buckets = list(itertools.product(dtypes, _ints(args.head_dims), _ints(args.groups), _ints(args.q_rows),
                                     _ints(args.kv_lens)))
    print(f"tuning {len(buckets)} buckets x {kernels} on {env['device']} -> {path}", flush=True)
    done = 0
    for dtype, D, group, Tq, kv in buckets:
        if args.budget_s is not None and time.time() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached after {done}/{len(buckets)} buckets", flush=True)
            break
        bucket = {"kv_len": kv, "q_rows": Tq, "head_dim": D, "group": group, "dtype": dtype}
        problem = make_problem(kv, Tq, D, group, DTYPE_NAMES[dtype], device, heads=args.heads)
        for kernel in kernels:
            entry, rejected = TUNERS[kernel](problem, args, device, print)
            msg = f"[{time.time() - start:6.1f}s] {kernel:<19} {bucket}"
            if entry is None:
                print(f"{msg}: every candidate failed: {rejected[:3]}", flush=True)
                continue
            entry = {"bucket": bucket, **entry, "rejected": len(rejected)}
            results[kernel].append(entry)
            print(f"{msg}: {entry['config']} {entry['time_us']} us"
                  + (f" ({entry['gbps']} GB/s)" if "gbps" in entry else "")
                  + (f"; {len(rejected)} rejected, e.g. {rejected[0]['why'][:80]}" if rejected else ""), flush=True)
        done += 1
        del problem
        if device == "cuda":
            torch.cuda.empty_cache()
        if any(results.values()):
            write_table(path, env, results, grid)  # after every bucket: an interrupted sweep keeps its results
    if not any(results.values()):
        print(f"pdllm: error: nothing was tuned ({done} buckets, every candidate failed; see above); "
              f"{path} not written", file=sys.stderr)
        return 1
    print(f"wrote {path} ({sum(len(v) for v in results.values())} entries, {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
