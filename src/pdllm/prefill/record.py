"""Prefill-decode disaggregation: the selection and cache build of a batch as one record.

``run_prefill`` (method.py) runs selection and cache build alone and returns a ``PrefillRecord`` (layouts,
positions, pool rows, the pool's K/V: ``chunk_query`` sends the encoded prefix and chunks;
``full_prompt_mask`` re-encodes at each block start, so it sends none), which ``send_record`` /
``recv_record`` move between torch.distributed ranks and ``save_record`` / ``load_record`` keep in
a safetensors file; ``decode_record`` (method.py) decodes from it the tokens one process would. Nothing is
pickled: the header is JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pdllm import distributed
from pdllm.prefill.layout import Layout

RECORD_VERSION = 1
RECORD_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32)}


@dataclass
class PrefillRecord:
    """What the decode needs from the prefill, for every request of a batch.

    ``layouts`` (prefill.layout.Layout): tokens, positions, chunk spans, query and answer starts;
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


def save_record(record: PrefillRecord, path) -> None:
    """The record as one safetensors file (the header in its metadata)."""
    tensors, header = record.tensors()
    save_file({k: t.cpu() for k, t in tensors.items()}, str(path), metadata={"pdllm.prefill_record": json.dumps(header)})


def load_record(path, device="cpu") -> PrefillRecord:
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
    distributed.send_tensors(tensors, header, dst, f"sending the prefill record to rank {dst}", group)


def recv_record(src: int, group=None, device=None) -> PrefillRecord:
    """Receive the record ``send_record`` sends from rank ``src``; its tensors stay where they were
    received (this rank's GPU under NCCL, the CPU under gloo) unless ``device`` says otherwise."""
    what = f"prefill record from rank {src}"
    tensors, header = distributed.recv_tensors(src, what, RECORD_DTYPES, group, device)
    return PrefillRecord.from_tensors(tensors, header, what)
