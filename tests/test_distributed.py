"""pdllm.distributed: several processes give what one process gives.

The multi-process tests (marked slow) start real torchrun jobs (``python -m torch.distributed.run --standalone``,
2 gloo processes on the CPU, tests/distributed_worker.py as each rank) with timeouts, and compare
what every rank wrote with the same work done here in one process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdllm import distributed
from pdllm.distributed import owners
from pdllm.prefill import decode_record, load_record, run_prefill, save_record
from pdllm.prefill import Prefill
from pdllm.sampler import generate
from pdllm.testing import assert_close

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"


def torchrun(*args, nproc=2):
    """The command of a torchrun job of ``nproc`` ranks (--standalone: on a free port of its own)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]


class Jobs:
    """Commands running at the same time with the GPUs hidden (gloo ranks on the CPU, one thread
    each); ``results()`` waits for them: (returncode, stderr) of each. One still running after
    ``timeout`` seconds fails the test (a hang must not hang the suite)."""

    def __init__(self, *commands, timeout=240):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        self.timeout = timeout
        self.started = [subprocess.Popen(list(map(str, c)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True, env=env) for c in commands]

    def results(self) -> list[tuple[int, str]]:
        try:
            return [(job.returncode, err) for job in self.started for _, err in [job.communicate(timeout=self.timeout)]]
        finally:
            for job in self.started:
                job.kill()
                job.wait()


def test_shares_are_contiguous_balanced_by_weight_and_may_leave_ranks_idle():
    assert owners([1] * 8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert owners([6, 1, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1, 1]  # by weight, not by count
    assert owners([1, 1], 4) == [0, 2]  # two chunks, four ranks: two of them idle
    assert owners([], 3) == []
    for n, size in ((1, 1), (5, 3), (17, 8)):
        who = owners([1] * n, size)
        assert who == sorted(who) and max(who) < size


def test_chunk_parallel_in_one_process_is_the_plain_method(llada):
    batch, _ = worker.batches(llada)
    for knobs in worker.CASES.values():
        assert worker.run(llada, batch, chunk_parallel=True, **knobs) == worker.run(llada, batch, **knobs)


@pytest.mark.parametrize("model_name, knobs", [("llada", dict(cache_mode="chunk_query")),
                                               ("llada", dict(cache_mode="full_prompt_mask", token_capacity=5)),
                                               ("dream", dict(cache_mode="chunk_query", encode_once=False))])
def test_a_saved_prefill_record_decodes_the_tokens_of_one_process(model_name, knobs, request, tmp_path):
    model = request.getfixturevalue(model_name)
    batch, _ = worker.batches(model)
    whole = generate(model, batch, worker.GEN, method=Prefill(chunk_size=8, top_k=3, **knobs))
    record = run_prefill(model, batch, worker.GEN, Prefill(chunk_size=8, top_k=3, **knobs))
    save_record(record, tmp_path / "prefill.safetensors")
    loaded = load_record(tmp_path / "prefill.safetensors")
    assert (loaded.k.shape[1] > 0) == (knobs["cache_mode"] == "chunk_query")  # full_prompt_mask encodes at decode
    out = decode_record(model, loaded, worker.GEN)
    assert torch.equal(out.tokens, whole.tokens)
    assert out.stats["selected"] == whole.stats["selected"] and out.stats["from_record"]


def test_a_record_is_refused_by_another_model_or_gen_length_and_a_foreign_file_by_name(llada, dream, tmp_path):
    from safetensors.torch import save_file

    batch, _ = worker.batches(llada)
    record = run_prefill(llada, batch, worker.GEN, Prefill(chunk_size=8, top_k=2, cache_mode="chunk_query"))
    with pytest.raises(ValueError, match="same checkpoint and dtype"):
        decode_record(dream, record, worker.GEN)
    with pytest.raises(ValueError, match="gen_length=8"):
        generate(llada, record.prompts(), worker.GEN.__class__(gen_length=4, block_length=4, steps=4),
                 method=Prefill.from_record(record))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a pdllm prefill record"):
        load_record(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_record(tmp_path / "junk.safetensors")


@pytest.mark.slow  # two real torchrun jobs of 2 ranks, at the same time
def test_a_rank_that_stops_answering_or_fails_ends_the_job_with_a_clear_error(llada_dir, tmp_path):
    # A hung job fails the test by Jobs' timeout: rank 1 of "hang" sleeps an hour, so an end
    # within it is rank 0's 2 s timeout, however long the ranks took to start on a loaded machine.
    errors = {"hang": "DistributedError: chunk-parallel scoring (all-gather of the chunk scores) failed on rank 0 of 2",
              "crash": "rank 1 failed mid-way through scoring"}
    jobs = Jobs(*(torchrun(WORKER, llada_dir, tmp_path / scenario, scenario) for scenario in errors)).results()
    for (code, stderr), (scenario, error) in zip(jobs, errors.items()):
        assert code != 0 and error in stderr, (scenario, stderr[-3000:])


def without_timings(report):
    """The report with its wall-clock figures (``seconds``) left out: everything else must match."""
    if isinstance(report, dict):
        return {k: without_timings(v) for k, v in report.items() if k != "seconds"}
    if isinstance(report, list):
        return [without_timings(v) for v in report]
    return report


# the embedded toy model on kv_lookup at 512 tokens, one chunk kept: it answers some and misses some
EVAL = ["--lengths", "512", "--depths", "0,1", "--n", "2", "--methods", "vanilla,prefill", "--ablations", "none",
        "--tasks", "kv_lookup", "--gen-length", "8", "--batch-size", "1", "--chunk-size", "64", "--top-k", "1"]


@pytest.mark.slow  # two real torchrun jobs of 2 ranks, at the same time
def test_torchrun_ranks_write_what_one_process_computes(llada_dir, llada, tmp_path):
    """Chunk-parallel generate (every case of worker.CASES, a world larger than the chunks, a prefill
    record sent from rank 0 and decoded on rank 1) and the data-parallel eval (the JSON of one
    process). Both jobs run at once, while this process computes the same."""
    from pdllm.eval.harness import main as eval_main

    # "--": torchrun's own parser would take --n for an abbreviation of one of its flags
    jobs = Jobs(torchrun(WORKER, llada_dir, tmp_path, "select"),
                torchrun("-m", "pdllm.cli", "--", "eval", *EVAL, "--out", tmp_path / "two"))
    batch, tiny = worker.batches(llada)
    cases = [*worker.CASES.items(), ("idle_ranks", dict(top_k=2))]
    alone = {name: worker.run(llada, tiny if name == "idle_ranks" else batch, **knobs) for name, knobs in cases}
    sent = worker.run(llada, batch, top_k=3, cache_mode="chunk_query")
    assert eval_main([*EVAL, "--device", "cpu", "--out", str(tmp_path / "one")]) == 0
    for code, stderr in jobs.results():
        assert code == 0, stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, one in alone.items():
        for got in ranks:  # every rank selected the same chunks and decoded the same answer as one process
            assert got[name]["tokens"] == one["tokens"], name
            assert got[name]["selected"] == one["selected"], name
            for a, b in zip(got[name]["scores"], one["scores"]):
                assert_close(torch.tensor(a), torch.tensor(b), torch.float32)
        assert ranks[0][name]["scores"] == ranks[1][name]["scores"]  # gathered copies: bitwise the same
    assert ranks[1]["decoded_from_record"] == sent["tokens"]

    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    for report in (one, two):  # the machine each saw: the ranks' GPUs are hidden, this process's not
        del report["environment"]
    two["command"] = one["command"]  # the same arguments but --device cpu (the ranks' default) and --out
    assert without_timings(two) == without_timings(one)
    cells = [c for m in one["grid"].values() for L in m["kv_lookup"].values() for c in L.values()]
    assert len({c["correct"] for c in cells}) > 1  # not all right nor all wrong: the comparison says something


def test_each_rank_decodes_only_its_share_of_the_examples(llada, llada_dir, monkeypatch):
    from pdllm.eval.harness import run_examples
    from pdllm.sampler import GenerationConfig
    from pdllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(llada_dir)
    examples = [type("Example", (), dict(context="the quick brown fox " * (3 + i), question="what is the pass key",
                                         answer="fox", needle_span=(0, 4)))() for i in range(5)]
    gen = GenerationConfig(gen_length=4, block_length=4, steps=4)
    alone = run_examples(llada, tok, examples, gen, "prefill", 2, chunk_size=8, top_k=1)
    calls = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)  # rank 1 of 2: the last of the 3 batches (2, 2, 1)
    monkeypatch.setattr(distributed, "all_gather_json", lambda obj, what: calls.append(obj) or [[], obj])
    mine = run_examples(llada, tok, examples, gen, "prefill", 2, chunk_size=8, top_k=1)
    assert len(calls[0]) == 1 and without_timings(mine) == without_timings(alone[4:])
