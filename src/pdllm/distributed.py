"""Past one GPU with PyTorch's own runtime (``torch.distributed``, started by ``torchrun``).

Three ways to use several processes, each a process per GPU (NCCL) or per CPU worker (gloo):

* **Chunk-parallel scoring** (``PrefillConfig.chunk_parallel``, ``--chunk-parallel``): every rank
  holds the model and scores a contiguous share of the chunks, balanced by tokens; the scores are
  all-gathered, so every rank selects the same top K and decodes the same answer. One process is
  the same code with a world of one.
* **Data-parallel evaluation** (``torchrun ... -m pdllm.cli eval``): each rank runs a contiguous
  share of the harness's units of work (a batch of synthetic examples, a benchmark example); the
  results are gathered in order and rank 0 writes the JSON one process would.
* **Prefill-decode disaggregation**: ``run_prefill`` runs selection and cache build alone and
  returns the result as one ``PrefillRecord`` (layout, the pool's K/V rows, positions), which
  ``send_record`` / ``recv_record`` move between ranks and ``save_record`` / ``load_record`` keep
  in a safetensors file; ``decode_record`` decodes from it the tokens one process would.

Every collective has a timeout (``init(timeout_s=...)``) and a failed one is a ``DistributedError``
naming what was being exchanged, so a rank that dies or hangs ends the job instead of hanging it.
Nothing here pickles: objects travel as JSON bytes in uint8 tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600
# NVLink multicast (NVLS) stays off unless a variable says otherwise: on a shared multi-GPU host a
# program using it can take the host's GPUs out of service for everybody.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped or did not answer within the timeout."""


# ---------------------------------------------------------------------------------------------
# The process group
# ---------------------------------------------------------------------------------------------


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join torchrun's process group (``env://``: RANK, WORLD_SIZE, MASTER_ADDR/PORT) if this process
    was started by torchrun; NCCL with one GPU per local rank where CUDA is there, gloo otherwise.
    Idempotent; returns whether a process group is up. A process not started by torchrun stays a
    world of one."""
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local} has no GPU: this host has {torch.cuda.device_count()}; "
                                   "start at most that many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)  # "cuda" now means this rank's GPU, for the model and every tensor
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 speaks for the job: it prints and writes the results files."""
    return rank() == 0


def quiet_other_ranks():
    """The command line's output comes from rank 0 only (the other ranks compute the same answer);
    their stderr stays, so an error on any rank is seen."""
    if not is_main():
        import sys

        sys.stdout = open(os.devnull, "w")


def _device() -> torch.device:
    """Where a collective's tensors live: this rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, run: Callable):
    try:
        return run()
    except (RuntimeError, ValueError) as e:  # DistBackendError and gloo's errors are RuntimeErrors
        raise DistributedError(
            f"{what} failed on rank {rank()} of {world_size()}: another rank stopped, or did not answer within "
            f"the process group's timeout ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def all_gather_tensor(t: torch.Tensor, what: str) -> list[torch.Tensor]:
    """Every rank's tensor (same shape and dtype on each), in rank order, on the CPU."""
    if world_size() == 1:
        return [t.cpu()]
    dev = _device()
    mine = t.to(dev).contiguous()
    out = [torch.empty_like(mine) for _ in range(world_size())]
    _collective(what, lambda: dist.all_gather(out, mine))
    return [o.cpu() for o in out]


def all_gather_json(obj, what: str) -> list:
    """Every rank's JSON-able object, in rank order (as UTF-8 bytes in uint8 tensors: no pickle)."""
    if world_size() == 1:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = all_gather_tensor(torch.tensor([len(data)]), what)
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(data)] = data
    rows = all_gather_tensor(padded, what)
    return [json.loads(bytes(r[: int(n)].tolist()).decode()) for r, n in zip(rows, sizes)]


# ---------------------------------------------------------------------------------------------
# Shares: contiguous, balanced by weight
# ---------------------------------------------------------------------------------------------


def owners(weights: Sequence[float], size: int) -> list[int]:
    """The rank that takes each item: items in order, cut into ``size`` contiguous runs of about
    equal total weight (an item goes to the rank whose slice of the total its start falls in). With
    fewer items than ranks some ranks get none; rank 0 always gets the first."""
    total = float(sum(weights))
    out, before = [], 0.0
    for w in weights:
        out.append(min(size - 1, int(before / total * size)) if total > 0 else 0)
        before += w
    return out


def my_share(items: Sequence) -> list:
    """This rank's contiguous share of ``items`` (equal counts); a world of one takes them all.
    ``gather_in_order`` of what the shares give back is what one process would have made."""
    who = owners([1.0] * len(items), world_size())
    return [item for item, r in zip(items, who) if r == rank()]


def rank0_says(value, what: str = "rank 0's decision"):
    """Rank 0's value of a JSON-able decision (e.g. a time budget passed), on every rank, so that the
    ranks keep doing the same collectives."""
    return all_gather_json(value, what)[0]


def gather_in_order(results: list, what: str = "the evaluation results") -> list:
    """Every rank's list of JSON-able results, concatenated in rank order (the items' order, when
    each rank's list follows its ``my_share``)."""
    return [x for part in all_gather_json(results, what) for x in part]


def parallel_chunk_scores(score: Callable, chunks: list[list[list[int]]], weights: list[list[float]]):
    """Chunk-parallel scoring: ``score(part)`` scores ``part[b]``, a sub-list of request b's chunks,
    and returns one (len(part[b]),) tensor per request; this rank scores its token-balanced share
    of all the batch's chunks, and the scores are all-gathered, so every rank gets the same
    (n_chunks,) fp32 tensor per request (each score is a copy of the one its rank computed).

    Returns the scores and, per request and chunk, (the rank that scored it, its index in that
    rank's ``part[b]``)."""
    size = world_size()
    flat = [(b, i) for b, cs in enumerate(chunks) for i in range(len(cs))]
    who = owners([weights[b][i] for b, i in flat], size)
    where: list[list[tuple[int, int]]] = [[] for _ in chunks]
    part: list[list] = [[] for _ in chunks]
    for (b, i), r in zip(flat, who):
        where[b].append((r, sum(1 for w, _ in where[b] if w == r)))
        if r == rank():
            part[b].append(chunks[b][i])
    local = score(part)
    mine = torch.zeros(len(flat))
    for j, (b, i) in enumerate(flat):
        r, at = where[b][i]
        if r == rank():
            mine[j] = local[b][at]
    gathered = all_gather_tensor(mine, "chunk-parallel scoring (all-gather of the chunk scores)")
    scores = [torch.empty(len(cs)) for cs in chunks]
    for j, (b, i) in enumerate(flat):
        scores[b][i] = gathered[who[j]][j]
    return scores, where


def share_kept_kv(keep, selected: list[list[int]], where: list[list[tuple[int, int]]]):
    """Encode once across ranks: a selected chunk's K/V (its scoring forward's) is in the
    StreamedTopK of the rank that scored it, under that rank's index (a chunk of the global top K
    is in the top K of its rank's share, so it is held). Broadcast each from its rank, and hold
    the selected chunks, by their global index, on every rank."""
    if world_size() == 1:
        return
    dev = _device()
    for b, sel in enumerate(selected):
        blocks = []
        L, Hkv, _, D = keep.cache.k.shape
        shape = (2, L, Hkv, len(keep.slots[b][0]), D)  # one slot's K and V, every layer
        for i in sel:
            r, at = where[b][i]
            kv = torch.empty(shape, dtype=keep.cache.k.dtype, device=dev)
            if r == rank():
                held = keep.rows(b, at)
                kv[0], kv[1] = keep.cache.k[:, :, held], keep.cache.v[:, :, held]
            _collective(f"chunk-parallel scoring (broadcast of chunk {i}'s K/V from rank {r})",
                        lambda: dist.broadcast(kv, src=r))
            blocks.append(kv)
        keep.held[b], keep.rank[b] = {i: slot for slot, i in enumerate(sel)}, {}
        for slot, kv in enumerate(blocks):
            keep.cache.store(keep.slots[b][slot], kv[0].to(keep.cache.k.device), kv[1].to(keep.cache.v.device))


# ---------------------------------------------------------------------------------------------
# Prefill-decode disaggregation: the prefill's result as one record
# ---------------------------------------------------------------------------------------------

RECORD_VERSION = 1
RECORD_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32)}


@dataclass
class PrefillRecord:
    """What the decode needs from the prefill, for every request of a batch.

    ``layouts`` (pdllm.prefill.Layout): tokens, positions, chunk spans, query and answer starts;
    ``rows``: the pool rows each request reads, in layout order; ``k``/``v``: the pool's K/V rows
    [0, pool_rows) as stored, (L, pool_rows, Hkv, D) (``chunk_query``: prefix and kept chunks
    encoded; ``full_prompt_mask`` re-encodes them at each block start, so none are sent);
    ``config``: the PrefillConfig fields; ``selected``/``scores``/``chunk_lengths``/``stats``: what
    the selection found, for inspection.
    """

    layouts: list
    rows: list[torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor
    pool_rows: int
    gen_length: int
    config: dict
    model_shape: dict  # n_layers, n_kv_heads, head_dim, dtype of the model that made it
    selected: list[list[int]]
    scores: list[torch.Tensor]
    chunk_lengths: list[list[int]]
    stats: dict

    def prompts(self) -> list[list[int]]:
        """Prompts for the decode's sampler: prefix + kept chunks + query of each layout (what the
        prefill's method decodes against; the rest of the context is not needed any more)."""
        return [lay.tokens[: lay.gen_start] for lay in self.layouts]

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The record as named tensors and a JSON-able header (for safetensors and send/recv)."""
        out = {"k": self.k.contiguous(), "v": self.v.contiguous()}
        for b, lay in enumerate(self.layouts):
            out[f"rows.{b}"] = self.rows[b].long().cpu()
            out[f"tokens.{b}"] = torch.tensor(lay.tokens, dtype=torch.int64)
            out[f"positions.{b}"] = torch.tensor(lay.positions, dtype=torch.int64)
            out[f"scores.{b}"] = self.scores[b].float().cpu()
        header = {"version": RECORD_VERSION, "requests": len(self.layouts), "pool_rows": self.pool_rows,
                  "gen_length": self.gen_length, "config": self.config, "model_shape": self.model_shape,
                  "selected": self.selected, "chunk_lengths": self.chunk_lengths, "stats": self.stats,
                  "spans": [[list(s) for s in lay.chunk_spans] for lay in self.layouts],
                  "query_start": [lay.query_start for lay in self.layouts],
                  "gen_start": [lay.gen_start for lay in self.layouts]}
        return out, header

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], header: dict, where: str) -> "PrefillRecord":
        from pdllm.prefill import Layout

        if header.get("version") != RECORD_VERSION:
            raise ValueError(f"{where}: prefill record version {header.get('version')!r}, this pdllm reads "
                             f"version {RECORD_VERSION}; make the record again with this pdllm")
        n = header["requests"]
        missing = [name for name in ["k", "v"] + [f"{t}.{b}" for b in range(n) for t in ("rows", "tokens", "positions",
                                                                                           "scores")]
                   if name not in tensors]
        if missing:
            raise ValueError(f"{where}: not a complete prefill record, missing tensors {missing[:4]}")
        layouts = [Layout(tensors[f"tokens.{b}"].tolist(), tensors[f"positions.{b}"].tolist(),
                          [tuple(s) for s in header["spans"][b]], header["query_start"][b], header["gen_start"][b])
                   for b in range(n)]
        return cls(layouts, [tensors[f"rows.{b}"] for b in range(n)], tensors["k"], tensors["v"], header["pool_rows"],
                   header["gen_length"], header["config"], header["model_shape"], header["selected"],
                   [tensors[f"scores.{b}"] for b in range(n)], header["chunk_lengths"], header["stats"])

    def check_model(self, model):
        """A record decodes only on a model of the shape and dtype that made it."""
        have = model_shape(model)
        if have != self.model_shape:
            raise ValueError(f"this prefill record was made by a model with {self.model_shape}, the decoding model "
                             f"has {have}: decode with the same checkpoint and dtype")


def model_shape(model) -> dict:
    c = model.cfg
    return {"n_layers": c.n_layers, "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "dtype": str(model.dtype)}


def run_prefill(model, prompts, config, method, pad_id: int | None = None) -> PrefillRecord:
    """Selection and cache build for a batch, without decoding; the method's result as a record.
    ``method`` is a ``Prefill`` (its config says how to select)."""
    from pdllm.sampler import make_batch, synchronize

    batch = make_batch(model, prompts, config, model.cfg.eos_id if pad_id is None else pad_id)
    with torch.no_grad():
        method.begin(model, batch)
    synchronize(model.device)
    return method.record(model)


def decode_record(model, record: PrefillRecord, config, cuda_graphs: bool = True, **generate_kwargs):
    """The decode of a prefill record: the tokens ``generate`` gives when the prefill runs in the same
    process (same model, same GenerationConfig)."""
    from pdllm.prefill import Prefill
    from pdllm.sampler import generate

    return generate(model, record.prompts(), config, method=Prefill.from_record(record, cuda_graphs),
                    **generate_kwargs)


def save_record(record: PrefillRecord, path) -> None:
    """The record as one safetensors file (the header in its metadata)."""
    from safetensors.torch import save_file

    tensors, header = record.tensors()
    save_file({k: t.cpu() for k, t in tensors.items()}, str(path), metadata={"pdllm.prefill_record": json.dumps(header)})


def load_record(path, device="cpu") -> PrefillRecord:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if "pdllm.prefill_record" not in meta:
                raise ValueError(f"{path}: a safetensors file, but not a pdllm prefill record (no header); "
                                 "write it with pdllm.distributed.save_record")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from e
    return PrefillRecord.from_tensors(tensors, json.loads(meta["pdllm.prefill_record"]), str(path))


def send_record(record: PrefillRecord, dst: int, group=None) -> None:
    """Send a record to rank ``dst`` (point to point; ``recv_record`` on that rank takes it)."""
    tensors, header = record.tensors()
    header["tensors"] = [[name, str(t.dtype), list(t.shape)] for name, t in tensors.items()]
    data = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8)
    dev, what = _device(), f"sending the prefill record to rank {dst}"
    _collective(what, lambda: dist.send(torch.tensor([len(data)], device=dev), dst, group))
    _collective(what, lambda: dist.send(data.to(dev), dst, group))
    for t in tensors.values():
        _collective(what, lambda t=t: dist.send(t.to(dev).contiguous(), dst, group))


def recv_record(src: int, group=None, device=None) -> PrefillRecord:
    """Receive the record ``send_record`` sends from rank ``src``; its tensors stay where they were
    received (this rank's GPU under NCCL, the CPU under gloo) unless ``device`` says otherwise."""
    dev, what = _device(), f"receiving the prefill record from rank {src}"
    n = torch.zeros(1, dtype=torch.int64, device=dev)
    _collective(what, lambda: dist.recv(n, src, group))
    data = torch.zeros(int(n), dtype=torch.uint8, device=dev)
    _collective(what, lambda: dist.recv(data, src, group))
    header = json.loads(bytes(data.cpu().tolist()).decode())
    tensors = {}
    for name, dtype, shape in header.pop("tensors"):
        if dtype not in RECORD_DTYPES:
            raise ValueError(f"prefill record from rank {src}: tensor {name} has dtype {dtype}, not one of "
                             f"{sorted(RECORD_DTYPES)}")
        t = torch.empty(shape, dtype=RECORD_DTYPES[dtype], device=dev)
        _collective(what, lambda t=t: dist.recv(t, src, group))
        tensors[name] = t if device is None else t.to(device)
    return PrefillRecord.from_tensors(tensors, header, f"prefill record from rank {src}")

