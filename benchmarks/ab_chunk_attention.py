"""Two versions of the chunk-attention kernel side by side, in one run, on one GPU.

For a kernel change, the honest figure is a ratio measured in the same process: this script loads
a baseline copy of ``triton_kernels/chunk_attention.py`` (e.g. from an earlier commit) next to the
installed one and times both on the shapes of ``bench_chunk_attention.py`` with the same launch
configs, by CUDA-graph replays over rotating layers (no L2 flush), as that benchmark does:

    git show <rev>:triton_kernels/chunk_attention.py > /tmp/before.py
    python benchmarks/ab_chunk_attention.py --baseline /tmp/before.py --out ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_chunk_attention import CASES, inputs, needed_bytes, rotating_time_ms  # noqa: E402
from ceilings import copy_gbps as measure_copy_gbps  # noqa: E402

from pdllm.environment import environment  # noqa: E402


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="a copy of chunk_attention.py to compare with")
    p.add_argument("--also", type=Path, nargs="*", default=[], help="more copies to time (reported, not the baseline)")
    p.add_argument("--splits", default="4,8,12,16", help="num_splits to time (each with both versions)")
    p.add_argument("--config", default='{"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}',
                   help="JSON launch config, or 'table': each version's tuned table and defaults (--splits ignored)")
    p.add_argument("--cases", default="sparse-32K,full-8K,full-32K")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from pdllm.attention import chunk_attention_reference
    from pdllm.testing import assert_close
    from pdllm.triton_kernels import chunk_attention as current

    versions = {"baseline": load_module(args.baseline, "chunk_attention_baseline")}
    versions.update({f.stem: load_module(f, f"chunk_attention_{i}") for i, f in enumerate(args.also)})
    versions["current"] = current
    base_cfg = None if args.config == "table" else json.loads(args.config)
    copy_gbps = measure_copy_gbps()  # the rate `pytest --benchmark` reports against
    rows = []
    for case in [c for c in CASES if c.name in args.cases.split(",")]:
        q, k_cache, v_cache, index, kv_len = inputs(case)
        ref = chunk_attention_reference(q, k_cache[0], v_cache[0], index, kv_len)[0]
        # What a plain device copy moving the same bytes achieves, timed the same way: the ceiling
        # at this size (launch, ramp-up and tail cost a copy too), next to the 1 GiB copy's rate.
        half = needed_bytes(case) // 2
        srcs = [torch.empty(half, dtype=torch.uint8, device="cuda") for _ in range(4)]
        dsts = [torch.empty_like(x) for x in srcs]
        same_size_copy_gbps = 2 * half / (rotating_time_ms(lambda i: dsts[i].copy_(srcs[i]))[0] * 1e-3) / 1e9
        print(f"{case.name}: a copy of the same bytes runs at {same_size_copy_gbps:.0f} GB/s "
              f"({100 * same_size_copy_gbps / copy_gbps:.1f}% of the 1 GiB copy)", flush=True)
        del srcs, dsts
        for splits in [None] if base_cfg is None else [int(s) for s in args.splits.split(",")]:
            cfg = None if base_cfg is None else dict(base_cfg, num_splits=splits)
            times, methods = {}, {}
            for name, mod in versions.items():
                def fn(i, mod=mod, cfg=cfg):
                    return mod.chunk_attention(q, k_cache[i], v_cache[i], index, kv_len, config=cfg)[0]

                assert_close(fn(0), ref, dtype=q.dtype, msg=f"{name} disagrees with the reference")
                ms, methods[name] = rotating_time_ms(fn)
                times[name] = ms * 1e3
            pct = {n: 100 * needed_bytes(case) / (t * 1e-6) / 1e9 / copy_gbps for n, t in times.items()}
            row = {"case": case.name, "config": cfg, "time_us": times, "pct_copy_bw": pct, "timing": methods,
                   "same_size_copy_gbps": same_size_copy_gbps,
                   "speedup_vs_baseline": times["baseline"] / times["current"]}
            rows.append(row)
            print(f"{case.name:<12} splits {splits or 'table':>5}: " + "  ".join(f"{n} {t:7.1f} us ({pct[n]:4.1f}%)" for n, t in times.items())
                  + f"  current x{row['speedup_vs_baseline']:.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({**environment(), "copy_gbps": copy_gbps, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
