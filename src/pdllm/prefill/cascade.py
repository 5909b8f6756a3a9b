"""Step 2, cascaded attention scoring: chunks that are clearly irrelevant after a few layers do not
run the rest of them.

Every chunk runs to the first exit layer and is scored there (the attention its query and answer
slot rows give its keys, in the ``score_layers`` layers before the exit, as an early-exit score
at that depth would be); only the best fraction of each request's chunks continues to the next
exit, and so on; the survivors run to the last layer and are ranked there as the attention scorer
ranks them at full depth. A chunk dropped early scores -inf: it ranks below every survivor. At
each exit at least ``cascade_min`` chunks survive (never fewer than the selection keeps), so with
exits that never drop a chunk the selection would pick, this *is* full-depth selection, at a
fraction of its cost: exits at 1/4, 1/2 and 3/4 of the depth keeping half each time run 47% of the
layer-chunks. How early a chunk can be judged is the model's property, not the method's: the
schedule (``cascade``) comes from a measurement on the user's checkpoint (``pdllm calibrate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdllm.prefill.scorers import AttentionProbe, AttentionScorer, batches
from pdllm.prefill.selectors import score_order
from pdllm.prefill.stages import SCORERS, Chunked, scored


def parse_schedule(text: str) -> list[tuple[int, float]]:
    """"8:0.5,16:0.5" -> [(8, 0.5), (16, 0.5)]: after layer 8 keep half, after 16 half of those."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer, _, keep = part.partition(":")
        out.append((int(layer), float(keep)))
    return out


@SCORERS.register
@dataclass(frozen=True)
class CascadeScorer(AttentionScorer):
    """``cascade``: attention scoring in stages, the chunks dropped at each exit layer running no
    further; the survivors ranked at full depth. ``cascade`` is the schedule, "L1:keep1,L2:keep2,..."
    (exit layers, increasing, below the model's depth; the fraction of the alive chunks each
    keeps); an empty schedule is the attention scorer at full depth."""

    name = "cascade"
    cascade: str = ""  # exit layers and keep fractions, "8:0.5,16:0.5,24:0.5"
    cascade_min: int = 4  # chunks that survive every exit at least (>= the selection's top_k)

    def problems(self):
        out = super().problems()
        try:
            schedule = parse_schedule(self.cascade)
        except ValueError:
            return out + [f"cascade={self.cascade!r} must read 'layer:keep,layer:keep' (e.g. '8:0.5,16:0.5')"]
        layers = [layer for layer, _ in schedule]
        if layers != sorted(set(layers)) or any(layer < 1 for layer in layers):
            out.append(f"cascade={self.cascade!r}: exit layers must be >= 1 and increasing")
        if any(not 0 < keep <= 1 for _, keep in schedule):
            out.append(f"cascade={self.cascade!r}: keep fractions must be in (0, 1]")
        if self.cascade_min < 1:
            out.append(f"cascade_min={self.cascade_min} must be >= 1")
        return out

    def check(self, cfg):
        top_k = getattr(cfg, "top_k", 1)
        if cfg.selection == "top_k" and self.cascade_min < top_k:
            return [f"cascade_min={self.cascade_min} must be >= top_k={top_k}: an exit may not drop a chunk "
                    "the selection would keep"]
        return []

    def schedule(self, model) -> list[tuple[int, float]]:
        L = model.cfg.n_layers
        schedule = parse_schedule(self.cascade)
        if schedule and schedule[-1][0] >= L:
            raise ValueError(f"cascade={self.cascade!r} exits at layer {schedule[-1][0]}, not below the model's "
                             f"depth ({L} layers)")
        if self.score_depth is not None:
            raise ValueError("cascade scoring ranks the survivors at full depth: leave score_depth=None")
        return schedule

    def __call__(self, model, requests: list[Chunked], block_length: int, sink=None) -> list[torch.Tensor]:
        """(n_chunks,) fp32 per request. A staged forward keeps no K/V, so nothing is offered to
        ``sink``: with encode-once the kept chunks are encoded again, by ``encode``."""
        schedule = self.schedule(model)
        if not schedule or all(len(r.chunks) <= self.cascade_min for r in requests):
            return super().__call__(model, requests, block_length, sink)  # no exit would drop a chunk
        L, window = model.cfg.n_layers, self.score_layers
        exits = [layer for layer, _ in schedule] + [L]
        read = {layer for e in exits for layer in range(max(0, e - window), e)}  # layers whose attention is read
        jobs, owner = self.jobs(model, requests, block_length)
        hidden: dict[int, torch.Tensor] = {}  # job -> its residual stream at the last exit, (T, C)
        token_scores: dict[int, dict[int, torch.Tensor]] = {j: {} for j in range(len(jobs))}  # job -> layer -> (L_chunk,)
        alive = list(range(len(jobs)))
        scores = [torch.full((len(r.chunks),), float("-inf")) for r in requests]
        start = 0
        for level, stop in enumerate(exits):
            self._run(model, jobs, alive, hidden, token_scores, start, stop, read)
            level_scores = {j: torch.stack([token_scores[j][layer] for layer in range(max(0, stop - window), stop)])
                            .mean(dim=0).mean() for j in alive}
            if stop == L:
                for j in alive:
                    b, i = owner[j]
                    scores[b][i] = level_scores[j]
                break
            keep = schedule[level][1]
            survivors = []
            for b in range(len(requests)):
                mine = [j for j in alive if owner[j][0] == b]
                n_keep = min(len(mine), max(self.cascade_min, math.ceil(keep * len(mine))))
                order = score_order(torch.stack([level_scores[j] for j in mine])) if mine else []
                survivors += [mine[o] for o in order[:n_keep]]
            for j in set(alive) - set(survivors):
                hidden.pop(j, None)
            alive, start = sorted(survivors), stop
        return scores

    def _run(self, model, jobs, alive, hidden, token_scores, start: int, stop: int, read: set[int]):
        """Layers [start, stop) for the alive jobs, batched by shape; each job's residual stream at
        ``stop`` goes to ``hidden`` and its pooled attention in the layers of ``read`` to ``token_scores``."""
        dev, linears = model.device, self.linears(model)
        for ids in batches([jobs[j].shape for j in alive], self.score_batch):
            group = [alive[i] for i in ids]
            P, C, Q = jobs[group[0]].shape
            if start == 0:
                idx = torch.tensor([jobs[j].prefix + jobs[j].chunk + jobs[j].rows for j in group], device=dev)
                x = model.tok_emb(idx)
            else:
                x = torch.stack([hidden[j] for j in group])
            pos = torch.arange(x.shape[1], device=dev).expand(x.shape[0], -1)
            layers = sorted(read & set(range(start, stop)))
            probe = AttentionProbe(layers, slice(P + C, P + C + Q), slice(P, P + C), self.pool_kernel)
            x = model.run_layers(x, pos, start, stop, cache=probe, linears=linears)
            if start == 0:  # progress counts each chunk once, at its first stage
                scored(len(group), len(jobs))
            for row, j in enumerate(group):
                hidden[j] = x[row]
                for layer, per_token in zip(layers, probe.token_scores):
                    token_scores[j][layer] = per_token[row].float()
