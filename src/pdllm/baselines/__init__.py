"""Other dLLM accelerations as sampler methods: dLLM-Cache and DyLLM (see each module)."""

import torch


def finish_forward(method, model, h: torch.Tensor, counts: list[int], start: int, end: int) -> torch.Tensor:
    """Shared end of a cached forward: record how many (row, layer) pairs were recomputed, then the
    logits of the block from the residual stream h (B, T, C)."""
    B, T = h.shape[:2]
    method.stats["recomputed_rows"].append(counts)
    method._recomputed += sum(counts)
    method._total += len(counts) * B * T
    method.stats["recomputed_fraction"] = method._recomputed / method._total
    shift = model.cfg.logit_shift  # Dream: the logit at row i predicts token i + 1
    return model.lm_head(model.norm_f(h[:, start - shift : end - shift]))
