"""Other dLLM accelerations as sampler methods: dLLM-Cache and DyLLM (see each module), and the
two pieces both use: the count of what a cached forward recomputed, and the block's logits."""

import torch


class RecomputeCount:
    """The (row, layer) pairs a cached method recomputed over one generate call."""

    def __init__(self):
        self.per_forward: list[list[int]] = []  # per forward: recomputed rows per layer, summed over the batch
        self.recomputed, self.total = 0, 0

    def add(self, counts: list[int], rows: int):
        """One forward: counts[layer] rows recomputed out of `rows` (batch * sequence) per layer."""
        self.per_forward.append(counts)
        self.recomputed += sum(counts)
        self.total += len(counts) * rows

    def stats(self) -> dict:
        fraction = self.recomputed / self.total if self.total else 0.0
        return {"recomputed_rows": self.per_forward, "recomputed_fraction": fraction}


def block_logits_from(model, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The logits predicting tokens [start, end) from the last residual stream h (B, T, C)."""
    shift = model.cfg.logit_shift  # Dream: the logit at row i predicts token i + 1
    return model.lm_head(model.norm_f(h[:, start - shift : end - shift]))
