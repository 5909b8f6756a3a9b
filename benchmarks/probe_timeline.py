"""Where a chunk-attention launch spends its time: per-program clock stamps, on a GPU.

A diagnostic, not a benchmark. It runs the kernel compiled with its TIMING branch
(``chunk_attention(..., timestamps=buf)``: ``%globaltimer`` read at program start, after the key
loop, after the split ticket and at the end, plus the SM id) on the shapes of
``bench_chunk_attention.py`` by CUDA-graph replays over 4 layers (as that benchmark times them),
and reports per launch: the spread of program start times, the key loop's duration (min / median
/ max over programs), the publish (partial store + fence + ticket) and combine durations of the
split combine, and the idle gap between consecutive launches:

    python benchmarks/probe_timeline.py --cases sparse-32K,full-8K --splits 4,8 --out timeline.json

The stamps cost a few stores per program, so the probed launch is a little slower than the real one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_chunk_attention import CASES, ROTATE, inputs, needed_bytes, rotating_time_ms  # noqa: E402
from ceilings import copy_gbps  # noqa: E402

from pdllm.environment import environment  # noqa: E402

START, LOOP_END, TICKET_AT, END, SM, TICKET = range(6)  # the kernel's TIMESTAMP_SLOTS, in order


def summarise(stamps: torch.Tensor, splits: int, t0: float) -> dict:
    """stamps (programs, SLOTS) int64 ns of one launch -> durations in us."""
    s = stamps.double()
    start, loop_end, ticket_at, end = (s[:, i] - t0 for i in (START, LOOP_END, TICKET_AT, END))
    loop = loop_end - start
    q = lambda x: [round(v / 1e3, 2) for v in (x.min().item(), x.median().item(), x.max().item())]  # noqa: E731
    row = {"start_spread_us": round((start.max() - start.min()).item() / 1e3, 2),
           "loop_us_min_med_max": q(loop), "last_loop_end_us": round(loop_end.max().item() / 1e3, 2),
           "end_us": round(end.max().item() / 1e3, 2), "sms": len(set(stamps[:, SM].tolist()))}
    if splits > 1:
        combiner = stamps[:, TICKET] == splits - 1
        row["publish_us_min_med_max"] = q(ticket_at - loop_end)
        row["combine_us_min_med_max"] = q(end[combiner] - ticket_at[combiner])
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="sparse-32K,full-8K")
    p.add_argument("--splits", default="", help="comma-separated split counts (default: the tuned table's)")
    p.add_argument("--config", default="{}", help="JSON launch config (default: the tuned table's)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--raw", action="store_true",
                   help="also keep every program's stamps of the second launch (split, KV head, SM id, us since "
                        "the launch's first start: start, loop end, ticket, end; ticket)")
    args = p.parse_args()
    from pdllm.triton_kernels.chunk_attention import TIMESTAMP_SLOTS, chunk_attention, launch_config

    slots = TIMESTAMP_SLOTS.value
    copy = copy_gbps()  # the rate `pytest --benchmark` reports against
    results = []
    for case in [c for c in CASES if c.name in args.cases.split(",")]:
        q, k_cache, v_cache, index, kv_len = inputs(case)
        for splits in [int(s) for s in args.splits.split(",") if s] or [None]:
            cfg = json.loads(args.config)
            resolved = launch_config(q, k_cache.shape[1], index.shape[1], cfg or None, splits)
            programs = resolved["num_splits"] * q.shape[0] * k_cache.shape[1]
            buffers = [torch.zeros(programs * slots, dtype=torch.int64, device="cuda") for _ in range(ROTATE)]

            def fn(i, cfg=cfg, splits=splits, buffers=buffers):
                return chunk_attention(q, k_cache[i], v_cache[i], index, kv_len, config=cfg or None,
                                       num_splits=splits, timestamps=buffers[i])[0]

            ms = rotating_time_ms(fn)[0]
            stamps = [b.view(programs, slots).cpu() for b in buffers]  # the last replay's launches, in order
            t0 = stamps[0][:, START].min().item()
            launches = [summarise(s, resolved["num_splits"], t0) for s in stamps]
            gaps = [round((stamps[i + 1][:, START].min().item() - t0) / 1e3 - launches[i]["end_us"], 2)
                    for i in range(ROTATE - 1)]
            row = {"case": case.name, "config": {k: resolved[k] for k in ("BLOCK_N", "num_warps", "num_stages",
                                                                           "num_splits")},
                   "probed_time_us": round(ms * 1e3, 2),
                   "pct_copy_bw": round(100 * needed_bytes(case) / (ms * 1e-3) / 1e9 / copy, 1),
                   "launches": launches, "gaps_between_launches_us": gaps}
            if args.raw:
                one = stamps[1].double()
                base = one[:, START].min()
                row["programs"] = [[i % resolved["num_splits"], i // resolved["num_splits"], int(one[i, SM])]
                                   + [round((one[i, j] - base).item() / 1e3, 3) for j in (START, LOOP_END, TICKET_AT, END)]
                                   + [int(one[i, TICKET])] for i in range(programs)]
            results.append(row)
            print(json.dumps({k: row[k] for k in ("case", "config", "probed_time_us")} | launches[1]
                             | {"gaps_us": gaps}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({**environment(), "copy_gbps": copy, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
