"""Past one GPU with PyTorch's own runtime (``torch.distributed``, started by ``torchrun``): the
process group and the collectives pdllm uses, each a process per GPU (NCCL) or per CPU worker (gloo).

What uses them: chunk-parallel scoring and the prefill record (``pdllm.prefill.parallel``,
``pdllm.prefill.record``), and data-parallel evaluation (``pdllm.eval.harness``: each rank runs a
contiguous share of the work, gathered in order, rank 0 writes the JSON one process would). This
module knows none of them.

Every collective has a timeout (``init(timeout_s=...)``) and a failed one is a ``DistributedError``
naming what was being exchanged, so a rank that dies or hangs ends the job instead of hanging it.
Nothing here pickles: objects travel as JSON bytes in uint8 tensors.
"""

from __future__ import annotations

import json
import os
import sys
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


def broadcast_tensor(t: torch.Tensor, src: int, what: str) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank (the others pass a tensor of the same shape and dtype to
    receive into); returned where ``t`` lives."""
    if world_size() == 1:
        return t
    buf = t.to(_device()).contiguous()
    _collective(what, lambda: dist.broadcast(buf, src=src))
    return buf.to(t.device)


def send_tensors(tensors: dict[str, torch.Tensor], header: dict, dst: int, what: str, group=None) -> None:
    """Named tensors and a JSON-able header to rank ``dst`` (point to point; ``recv_tensors`` takes them)."""
    header = {**header, "tensors": [[name, str(t.dtype), list(t.shape)] for name, t in tensors.items()]}
    data = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8)
    dev = _device()
    _collective(what, lambda: dist.send(torch.tensor([len(data)], device=dev), dst, group))
    _collective(what, lambda: dist.send(data.to(dev), dst, group))
    for t in tensors.values():
        _collective(what, lambda t=t: dist.send(t.to(dev).contiguous(), dst, group))


def recv_tensors(src: int, what: str, dtypes: dict[str, torch.dtype], group=None, device=None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """What ``send_tensors`` sent from rank ``src``: (named tensors, header). A tensor of a dtype not
    in ``dtypes`` (name -> dtype) is refused. The tensors stay where they were received (this
    rank's GPU under NCCL, the CPU under gloo) unless ``device`` says otherwise."""
    dev = _device()
    n = torch.zeros(1, dtype=torch.int64, device=dev)
    _collective(what, lambda: dist.recv(n, src, group))
    data = torch.zeros(int(n), dtype=torch.uint8, device=dev)
    _collective(what, lambda: dist.recv(data, src, group))
    header = json.loads(bytes(data.cpu().tolist()).decode())
    tensors = {}
    for name, dtype, shape in header.pop("tensors"):
        if dtype not in dtypes:
            raise ValueError(f"{what}: tensor {name} has dtype {dtype}, not one of {sorted(dtypes)}")
        t = torch.empty(shape, dtype=dtypes[dtype], device=dev)
        _collective(what, lambda t=t: dist.recv(t, src, group))
        tensors[name] = t if device is None else t.to(device)
    return tensors, header
