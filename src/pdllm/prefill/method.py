"""Prefilling-dLLM as a sampler method: the pipeline of stages run once per batch (``begin``),
then decoding against the kept chunks' K/V (``block_logits``). See pdllm/prefill/__init__.py for
the method in the paper's order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pdllm.cache import ChunkKVCache
from pdllm.graphs import StepGraph, capture, graphs_available
from pdllm.methods import METHODS
from pdllm.prefill.cache_build import KeptKV, Pool, groups
from pdllm.prefill.config import PrefillConfig
from pdllm.prefill.layout import build_layout
from pdllm.prefill.parallel import score_across_ranks, share_kept_kv
from pdllm.prefill.record import PrefillRecord, model_shape
from pdllm.prefill.selectors import sparsify_tokens, widen
from pdllm.prefill.stages import Chunked
from pdllm.sampler import Batch, generate, make_batch, synchronize
from pdllm.tokenizer import LongContextPrompt


@dataclass
class Selection:
    """What the pipeline chose for a batch, per request: its chunks (``Chunked``: spans and rows),
    their scores and the selector's choice; then what the decode keeps: the chunks (the selected
    ones, or with ``keep_margin`` those widened and merged: ``kept_requests``, ``kept_selected``), the
    rows kept of each ({chunk: offsets}), and their scoring K/V (encode once) or None."""

    requests: list[Chunked]
    scores: list[torch.Tensor]
    selected: list[list[int]]
    kept_requests: list[Chunked]
    kept_selected: list[list[int]]
    kept: list[dict[int, torch.Tensor]]
    sink: KeptKV | None


@METHODS.register
class Prefill:
    """Prefilling-dLLM as a sampler method (``generate(..., method="prefill", top_k=4, ...)``)."""

    name = "prefill"
    supports_cfg = False  # the pool holds one conditional layout per request, no unconditional rows

    def __init__(self, config: PrefillConfig | None = None, cuda_graphs: bool = True, **overrides):
        self.cfg = PrefillConfig(**overrides) if config is None else config
        self.cuda_graphs = cuda_graphs  # replay decode steps from a CUDA graph (on a GPU)
        self.graph: StepGraph | None = None
        self.stats: dict = {}
        self.spans: list = []  # per request: its chunks as spans of the context (for inspection and the eval)
        self.selected: list[list[int]] = []  # per request: the selected chunks
        self.kept_spans: list = []  # per request: the spans the decode reads (the selected, or widened: keep_margin)
        self.scores: list[torch.Tensor] = []
        self.chunk_lengths: list[list[int]] = []
        self.received: PrefillRecord | None = None  # a record to decode from instead of selecting (from_record)

    # ---- the pipeline: chunk, score, select, sparsify, lay out, build --------------------------

    def select(self, model, prompts: list[LongContextPrompt], block_length: int) -> Selection:
        """Steps 1-4 for every request of the batch, the scoring forwards shared between them."""
        cfg = self.cfg
        chunker, scorer, selector, builder = (cfg.stage(s) for s in ("chunking", "score", "selection", "cache_mode"))
        bos = model.cfg.bos_id if cfg.chunk_bos else None
        if cfg.chunk_bos and bos is None:
            raise ValueError("chunk_bos=True but the model config has no bos_id; set it or pass chunk_bos=False")
        requests = [Chunked.of(p, chunker(p, bos), bos) for p in prompts]  # 1. chunking
        sink = None  # 2. scoring; with encode-once the best chunks' K/V is held as they stream by
        if builder.reads_scoring_kv() and scorer.provides_kv(model):
            held = getattr(selector, "held", lambda n: 0)  # a selector that names none holds none: its kept
            sink = KeptKV(model, requests, [held(len(r.spans)) for r in requests])  # chunks are encoded again
        if cfg.chunk_parallel:
            scores, owner = score_across_ranks(scorer, model, requests, block_length, sink)
        else:
            scores = scorer(model, requests, block_length, sink)
        selected = [selector(s, r) for s, r in zip(scores, requests)]  # 3. selection
        kept_requests, kept_selected = requests, selected
        if cfg.keep_margin:  # the neighbours' edges kept too: the decode's chunks are new spans
            kept_requests = [widen(r, sel, cfg.keep_margin, bos) for r, sel in zip(requests, selected)]
            kept_selected = [list(range(len(r.spans))) for r in kept_requests]
            sink = None if sink is None else KeptKV(model, kept_requests, [0] * len(kept_requests))
        elif sink is not None and cfg.chunk_parallel:
            share_kept_kv(sink, requests, selected, owner)
        if sink is not None:
            self.encode_missing(model, scorer, sink, kept_requests, kept_selected, block_length)
        if cfg.token_capacity is None:  # 4. token sparsity
            kept = [{i: torch.arange(len(r.chunks[i])) for i in sel} for r, sel in zip(kept_requests, kept_selected)]
        else:
            slots = block_length if cfg.score_slots is None else cfg.score_slots  # the answer rows scoring reads
            kept = sparsify_tokens(model, kept_requests, kept_selected, cfg.token_capacity, cfg.chunk_bos,
                                   cfg.token_query_window, slots, cfg.pool_kernel, cfg.score_batch)
        return Selection(requests, scores, selected, kept_requests, kept_selected, kept, sink)

    @staticmethod
    def encode_missing(model, scorer, sink: KeptKV, requests, selected, block_length: int):
        """Encode once, for the kept chunks the sink did not hold (a selector that reaches past the
        best it holds): their scoring forward again, which gives the K/V the first one gave."""
        missing = [r.share([i for i in sel if not sink.holds(b, i)]) for b, (r, sel) in enumerate(zip(requests, selected))]
        if not any(m.ids for m in missing):
            return
        extra = KeptKV(model, requests, [len(m.ids) for m in missing])
        scorer.encode(model, missing, block_length, extra)  # a scorer that provides K/V says how
        for b, m in enumerate(missing):
            for i in m.ids:
                sink.put(b, i, *extra.kv(b, i))

    def begin(self, model, batch: Batch):
        if self.received is not None:
            return self.restore(model, batch)
        cfg, gen = self.cfg, batch.config
        if not all(isinstance(p, LongContextPrompt) for p in batch.prompts):
            raise TypeError("method 'prefill' needs LongContextPrompt prompts (prefix, context, query); "
                            "build them with Tokenizer.long_context_prompt")
        self.graph = None  # a method object may be reused
        synchronize(model.device)
        t0 = time.perf_counter()
        sel = self.select(model, batch.prompts, gen.block_length)
        grid = cfg.chunk_size if cfg.position_grid == "chunk_size" else None  # 5. layout and cache build
        layouts = [build_layout(r.prompt, r.chunks, s, k, gen.gen_length, cfg.positions, model.cfg.mask_id, grid)
                   for r, s, k in zip(sel.kept_requests, sel.kept_selected, sel.kept)]
        synchronize(model.device)
        t1 = time.perf_counter()
        self.builder = cfg.stage("cache_mode")
        self.pool = self.builder.build(model, sel.kept_requests, layouts, sel.kept_selected, sel.kept, sel.sink)
        synchronize(model.device)
        self.gen_length = gen.gen_length
        self.spans = [r.spans for r in sel.requests]
        self.kept_spans = [[r.spans[i] for i in s] for r, s in zip(sel.kept_requests, sel.kept_selected)]
        self.selected, self.scores = sel.selected, sel.scores
        self.chunk_lengths = [[len(c) for c in r.chunks] for r in sel.requests]
        self.stats = {"score_s": t1 - t0, "build_s": time.perf_counter() - t1, "reencode_s": 0.0,
                      "encode_once": sel.sink is not None, "chunks": [len(c) for c in self.chunk_lengths],
                      "selected": self.selected, "kv_rows": [len(lay.tokens) for lay in layouts]}

    @property
    def positions_used(self) -> int:
        """The positions the decode places tokens at (the sampler's trained-length check)."""
        return max(max(lay.positions) + 1 for lay in self.pool.layouts)

    # ---- prefill-decode disaggregation: the state ``begin`` leaves is one record ---------------

    def record(self, model) -> PrefillRecord:
        """After ``begin``: layouts, pool rows and the pool's K/V as a PrefillRecord (chunk_query: the
        prefix and chunks are encoded; full_prompt_mask encodes at each block start: no K/V yet)."""
        cache = self.pool.cache
        used = cache.used if self.cfg.cache_mode == "chunk_query" else 0
        k, v = (t.transpose(1, 2)[:, :used] for t in (cache.k, cache.v))  # the storage's (L, rows, Hkv, D)
        return PrefillRecord(self.pool.layouts, self.pool.rows, k, v, cache.used, self.gen_length, self.cfg.as_dict(),
                             model_shape(model), self.selected, self.scores, self.chunk_lengths, dict(self.stats))

    @classmethod
    def from_record(cls, record: PrefillRecord, cuda_graphs: bool = True) -> "Prefill":
        """A method whose ``begin`` takes the selection and cache of a PrefillRecord instead of making them."""
        method = cls(PrefillConfig(**record.config), cuda_graphs)
        method.received = record
        return method

    def restore(self, model, batch: Batch):
        rec = self.received
        rec.check_model(model)
        if len(batch.prompts) != len(rec.layouts) or batch.config.gen_length != rec.gen_length:
            raise ValueError(f"the prefill record holds {len(rec.layouts)} requests for gen_length={rec.gen_length}; "
                             f"decode it with its prompts (record.prompts()) and gen_length={rec.gen_length}")
        self.graph = None
        cache = ChunkKVCache.for_model(model, rec.pool_rows)
        for pool, sent in ((cache.k, rec.k), (cache.v, rec.v)):
            pool.transpose(1, 2)[:, : sent.shape[1]] = sent.to(model.device)
        cache.used = rec.pool_rows
        self.builder = self.cfg.stage("cache_mode")
        self.pool = Pool(cache, rec.layouts, [r.to(model.device) for r in rec.rows])
        self.gen_length = rec.gen_length
        self.selected, self.scores, self.chunk_lengths = rec.selected, rec.scores, rec.chunk_lengths
        self.stats = {**rec.stats, "reencode_s": 0.0, "from_record": True}

    # ---- 6. decoding against the pool ------------------------------------------------------------

    def block_logits(self, model, x, start, end, step):
        shift = model.cfg.logit_shift  # Dream: the row before each token predicts it
        P = x.shape[1] - self.gen_length  # where the answer starts in the sampler's x
        first, last = start - P - shift, end - P  # answer-relative rows to run (the whole block)
        pool = self.pool
        if step == 0:  # the block start's re-encode, batched over requests of one shape, timed apart
            synchronize(x.device)
            t0 = time.perf_counter()
            for b, lay in enumerate(pool.layouts):
                pool.tokens[b][lay.gen_start :] = x[b, P:]
            logits = [None] * len(pool.layouts)
            for group in groups([self.builder.refresh_key(lay) for lay in pool.layouts]):
                for b, rows in zip(group, self.builder.refresh(model, pool, group, first, last - shift)):
                    logits[b] = rows
            out = torch.stack(logits)
            synchronize(x.device)
            self.stats["reencode_s"] = self.stats.get("reencode_s", 0.0) + time.perf_counter() - t0
            self.slot0 = out[:, :1].clone()  # slot 0's logit of the block start (kept: slot0_logit)
            return out
        if shift and self.cfg.slot0_logit == "block_start":  # the official dual cache: the row before the
            # block keeps its block-start K/V, and its logit (slot 0's) is the block start's
            return torch.cat([self.slot0, self._cached_step(model, x, start, end, 0, end - start - 1)], dim=1)
        return self._cached_step(model, x, start, end, shift, end - start)

    def _cached_step(self, model, x, start, end, lead, n_logits):
        """Run x[:, start - lead : end] against the pool (their K/V rewritten in place); the logits
        of its first n_logits rows."""
        P = x.shape[1] - self.gen_length
        idx = x[:, start - lead : end]
        if self.graph is not None and self.graph.key == (start, end):
            return self.graph(idx)
        pool = self.pool
        take = [slice(lay.gen_start + start - P - lead, lay.gen_start + end - P) for lay in pool.layouts]
        cache = pool.cache  # not self: a captured graph keeps `forward`, and self keeps the graph (a cycle)
        cache.set_write_rows(torch.stack([r[t] for r, t in zip(pool.rows, take)]))
        pos = torch.stack([p[t] for p, t in zip(pool.positions, take)])

        def forward(tokens):
            return model(tokens, pos, cache=cache, logits_slice=slice(0, n_logits))

        if self.cuda_graphs and graphs_available(x.device):
            self.graph = capture(forward, idx, key=(start, end))
            if self.graph is not None:
                return self.graph(idx)
        return forward(idx)


def run_prefill(model, prompts, config, method: Prefill, pad_id: int | None = None) -> PrefillRecord:
    """Selection and cache build for a batch, without decoding; the method's result as a record
    (its config says how to select)."""
    batch = make_batch(model, prompts, config, model.cfg.eos_id if pad_id is None else pad_id)
    with torch.no_grad():
        method.begin(model, batch)
    synchronize(model.device)
    return method.record(model)


def decode_record(model, record: PrefillRecord, config, cuda_graphs: bool = True, **generate_kwargs):
    """The decode of a prefill record: the tokens ``generate`` gives when the prefill runs in the same
    process (same model, same GenerationConfig)."""
    return generate(model, record.prompts(), config, method=Prefill.from_record(record, cuda_graphs),
                    **generate_kwargs)
