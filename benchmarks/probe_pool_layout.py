"""Does the K/V pool's memory layout change the kernel's rate? A diagnostic, on a GPU.

Times the chunk-attention kernel (CUDA-graph replays over 4 layers, as bench_chunk_attention.py)
on the sparse 4x1024-of-32K shape with the pool stored two ways, both read through
(layers, Hkv, P, D) views: head-major (layers, Hkv, P, D) storage, with the pool padded by a few
rows (power-of-two head strides or not), and row-major (layers, P, Hkv, D) storage, where one pool
row holds every head's K. This is the measurement behind ChunkKVCache's row-major pool:

    python benchmarks/probe_pool_layout.py --out pool_layout.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_chunk_attention import D, DTYPE, HKV, ROTATE, TQ, H, rotating_time_ms, sparse_index  # noqa: E402
from ceilings import copy_gbps  # noqa: E402

from pdllm.environment import environment  # noqa: E402


def time_layout(P: int, pad: int, row_major: bool, config: dict, copy: float) -> dict:
    from pdllm.triton_kernels.chunk_attention import bytes_moved, chunk_attention

    g = torch.Generator(device="cuda").manual_seed(P)
    q = torch.randn(1, H, TQ, D, device="cuda", dtype=DTYPE, generator=g)
    if row_major:
        k, v = (torch.randn(ROTATE, P + pad, HKV, D, device="cuda", dtype=DTYPE, generator=g).transpose(1, 2)
                for _ in range(2))
    else:
        k, v = (torch.randn(ROTATE, HKV, P + pad, D, device="cuda", dtype=DTYPE, generator=g) for _ in range(2))
    index = sparse_index(P, g)
    kv_len = torch.tensor([index.shape[1]], dtype=torch.int32, device="cuda")
    nbytes = bytes_moved(q, k[0], index)
    ms = rotating_time_ms(lambda i: chunk_attention(q, k[i], v[i], index, kv_len, config=config)[0])[0]
    return {"pool_rows": P, "pad_rows": pad, "storage": "(L, P, Hkv, D)" if row_major else "(L, Hkv, P, D)",
            "config": config, "time_us": ms * 1e3, "pct_copy_bw": 100 * nbytes / (ms * 1e-3) / 1e9 / copy}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default='{"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "num_splits": 4}')
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    config, copy = json.loads(args.config), copy_gbps()
    rows = []
    for row_major, pads in ((False, (0, 64, 1088, 4416)), (True, (0, 64, 1088))):
        for pad in pads:
            rows.append(time_layout(32768, pad, row_major, config, copy))
            print(rows[-1], flush=True)
    if args.out:
        args.out.write_text(json.dumps({**environment(), "copy_gbps": copy, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
