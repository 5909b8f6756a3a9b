"""One rank of tests/test_distributed.py's torchrun jobs (not collected by pytest: no test_ prefix).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py CKPT OUT SCENARIO

``select``: chunk-parallel generate for each knob set of CASES (and a batch with fewer chunks than
ranks), then a prefill record sent from rank 0 and decoded on rank 1; each rank writes what it got
to OUT/rank<r>.json for the test to compare with one process. ``hang``: rank 1 stops answering
during scoring; rank 0 must end with a DistributedError after its short timeout (2 s). ``crash``: rank 1
fails during scoring; the job must end with its error.
"""

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from pdllm import distributed
from pdllm.checkpoint import from_pretrained
from pdllm.prefill import Prefill, decode_record, recv_record, run_prefill, send_record
from pdllm.prefill.scorers import AttentionScorer
from pdllm.sampler import GenerationConfig, generate
from pdllm.tokenizer import LongContextPrompt

CASES = {  # name -> prefill knobs (chunk_size 8 on contexts of 20..45 tokens: 3..6 chunks per request)
    "attention": dict(top_k=2),
    "chunk_query": dict(top_k=3, cache_mode="chunk_query"),
    "token_capacity": dict(top_k=3, token_capacity=5),
    "draft": dict(top_k=2, score="draft"),
}
GEN = GenerationConfig(gen_length=8, block_length=4, steps=8)


def request_of(model, context_len, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, model.cfg.vocab_size - 20, (n,), generator=g).tolist()  # noqa: E731
    return LongContextPrompt(prefix=[model.cfg.bos_id] + ids(5), context=ids(context_len), query=ids(6))


def batches(model):
    """The batch every case runs, and one of a single 1-chunk request (a world larger than the chunks)."""
    return ([request_of(model, n, s) for s, n in ((0, 45), (1, 20), (2, 33))], [request_of(model, 6, 3)])


def run(model, prompts, **knobs):
    method = Prefill(chunk_size=8, **knobs)
    out = generate(model, prompts, GEN, method=method)
    return {"tokens": out.tokens.tolist(), "selected": method.selected, "scores": [s.tolist() for s in method.scores]}


def main(ckpt, out, scenario):
    torch.set_num_threads(1)
    distributed.init(timeout_s=120)  # joining waits for every rank: on a loaded machine they start seconds apart
    rank = distributed.rank()
    model = from_pretrained(ckpt, torch.float32)
    batch, tiny = batches(model)
    if scenario in ("hang", "crash"):
        if scenario == "hang":  # then the scoring's collectives get a short timeout
            torch.distributed.distributed_c10d._set_pg_timeout(timedelta(seconds=2))
        if rank == 1 and scenario == "hang":
            time.sleep(3600)  # a rank that stops answering; rank 0's all-gather must time out, not wait for it
        if rank == 1 and scenario == "crash":
            def fail(*args, **kwargs):
                raise RuntimeError("rank 1 failed mid-way through scoring (injected by the test)")

            AttentionScorer.__call__ = fail
        run(model, batch, top_k=2, chunk_parallel=True)
        return
    got = {name: run(model, batch, chunk_parallel=True, **knobs) for name, knobs in CASES.items()}
    got["idle_ranks"] = run(model, tiny, top_k=2, chunk_parallel=True)
    if rank == 0:  # prefill here, decode on rank 1
        record = run_prefill(model, batch, GEN, Prefill(chunk_size=8, top_k=3, cache_mode="chunk_query"))
        send_record(record, dst=1)
    else:
        record = recv_record(src=0)
        got["decoded_from_record"] = decode_record(model, record, GEN).tokens.tolist()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


if __name__ == "__main__":
    main(*sys.argv[1:4])
