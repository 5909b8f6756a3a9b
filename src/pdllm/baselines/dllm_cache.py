"""dLLM-Cache (arXiv 2506.06295): reuse each layer's features and recompute only what moved.

Cached per layer, for every row of the sequence: K and V, the attention output after the
o-projection, and the MLP output (before the residual adds). The rows form two regions: the
prompt [0, prompt_len) and the response [prompt_len, T), which is the WHOLE generation region
(every block), not only the current block.

Each forward is numbered over the whole generate call (step = 1, 2, ...; never reset per block,
as in the official hooks) and decides:

    refresh prompt    iff (step - 1) % prompt_interval   == 0      (K_p)
    refresh response  iff (step - 1) % response_interval == 0      (K_r)

so step 1 computes everything. Then, in every layer, the rows to recompute are

    the prompt rows      when the prompt is refreshed,
    the response rows    when the response is refreshed, else V-verify:
        v = v_proj(attn_norm(x)) for ALL response rows; the k = int(rho * n_response) rows whose
        new v has the lowest cosine similarity to the cached v (over all KV heads) are picked,
        and the V cache takes the new v of EVERY response row.

The picked rows get fresh Q, K, V, attention of their query rows over all keys (fresh K/V where
recomputed, the fresh response V, cached K/V elsewhere), the o-projection and the MLP. Every
other row adds its cached attention and MLP outputs to the residual stream
(x += attn_out; x += mlp_out), so the last hidden states, and the logits, exist for all rows.

Where the official code (its LLaDA and Dream hooks, cache_hook_LLaDA.py and cache_hook_Dream.py)
and the method's usual summary disagree, this follows the code:

* Layer 0 is NOT special. Summaries of the method say "layer 0 always full"; the official hooks
  apply the same four cases to every layer.
* The step counter is global per generate call (the official current_step; reset_cache runs
  once per sample).
* Defaults K_p=100, K_r=8, rho=0.25 are the LongBench-HotpotQA setting (gen 32, 32 steps) for
  which the method reports its largest speedup (9.1x); the official code as read does not confirm
  them, and its LLaDA demo uses K_p=100, K_r=7, rho=0.25.

Deliberate differences from the official code:

* K is cached after RoPE (the official code caches it before and rotates when attending). A
  row's position never changes during a generate call, so both give the same keys.
* Padding: the official hooks attend with no mask. Here padded keys are masked
  (batch.key_mask) and RoPE uses batch.pos, so each prompt of a padded batch gets its own answer.
* GQA is general (the official Dream hook hard-codes the 28/4 head split in its K scatter).

Dream's logits are shifted: the logits for x[:, start:end] come from rows start-1 .. end-2. In
the first block, row start-1 is the last prompt row; it is cached like every prompt row, as in
the official Dream hook.

Composition: standalone only. It runs its own full-sequence forward and cannot be combined with
the prefix/dual caches or Prefilling-dLLM; the sampler rejects classifier-free guidance for it.

Stats (``self.stats``, merged into GenerationOutput.stats):
    recomputed_rows      one list per forward: recomputed rows per layer, summed over the batch
    recomputed_fraction  recomputed (row, layer) pairs / all (row, layer) pairs, over the run
    prompt_refreshes, response_refreshes   how many forwards refreshed each region
``self.last_rows`` holds the last forward's recomputed rows per layer, (B, m) each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdllm.attention import dense_attention
from pdllm.baselines import RecomputeCount, block_logits_from
from pdllm.methods import METHODS


def _take(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows (B, m) of t along its token dim: (B, T, C) -> (B, m, C); (B, H, T, D) -> (B, H, m, D)."""
    if t.dim() == 3:
        return t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1]))
    return t.gather(2, rows[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))


def _put(t: torch.Tensor, rows: torch.Tensor, value: torch.Tensor) -> None:
    """In place, the inverse of _take: t's rows (B, m) := value."""
    if t.dim() == 3:
        t.scatter_(1, rows[..., None].expand(-1, -1, t.shape[-1]), value.to(t.dtype))
    else:
        t.scatter_(2, rows[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]), value.to(t.dtype))


@METHODS.register
class DllmCache:
    """dLLM-Cache with prompt interval K_p, response interval K_r and V-verify fraction rho."""

    name = "dllm_cache"
    supports_cfg = False  # never checked against vanilla with guidance's unconditional rows, so refused

    def __init__(self, prompt_interval: int = 100, response_interval: int = 8, rho: float = 0.25):
        for knob, value in (("prompt_interval", prompt_interval), ("response_interval", response_interval)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{knob}={value!r} must be an integer >= 1 (1 = refresh at every forward)")
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho={rho!r} must be in (0, 1]: the fraction of response rows V-verify recomputes")
        self.prompt_interval, self.response_interval, self.rho = int(prompt_interval), int(response_interval), rho
        self.stats: dict = {}

    def begin(self, model, batch):
        c, (B, T) = model.cfg, batch.x.shape
        kv = (c.n_layers, B, c.n_kv_heads, T, c.head_dim)
        feat = (c.n_layers, B, T, c.d_model)
        new = dict(dtype=model.dtype, device=model.device)
        self.k, self.v = torch.zeros(kv, **new), torch.zeros(kv, **new)
        self.attn_out, self.mlp_out = torch.zeros(feat, **new), torch.zeros(feat, **new)
        self.batch, self.forwards, self.last_rows = batch, 0, []
        self.rope = model.rope(batch.pos)  # (cos, sin), each (B, T, head_dim)
        self.mask = None if batch.key_mask is None else batch.key_mask[:, None, None, :]
        self.recompute = RecomputeCount()
        self.stats = {**self.recompute.stats(), "prompt_refreshes": 0, "response_refreshes": 0}

    def block_logits(self, model, x, start, end, step):
        self.forwards += 1
        P, (B, T) = self.batch.prompt_len, x.shape
        refresh_prompt = (self.forwards - 1) % self.prompt_interval == 0
        refresh_response = (self.forwards - 1) % self.response_interval == 0
        self.stats["prompt_refreshes"] += int(refresh_prompt)
        self.stats["response_refreshes"] += int(refresh_response)
        every = torch.arange(T, device=x.device).expand(B, T)
        fixed = ([every[:, :P]] if refresh_prompt else []) + ([every[:, P:]] if refresh_response else [])

        h = model.tok_emb(x)  # the residual stream of every row
        self.last_rows = []
        for layer, blk in enumerate(model.blocks):
            picked = [] if refresh_response or P == T else [self._v_verify(blk, layer, h, P)]
            rows = torch.cat(fixed + picked, dim=1) if fixed or picked else every[:, :0]
            if rows.shape[1]:
                self._attention(model, blk, layer, h, rows)
            h = h + self.attn_out[layer]
            if rows.shape[1]:
                _put(self.mlp_out[layer], rows, blk.mlp(blk.mlp_norm(_take(h, rows))))
            h = h + self.mlp_out[layer]
            self.last_rows.append(rows)

        counts = [B * r.shape[1] for r in self.last_rows]
        self.recompute.add(counts, B * T)
        self.stats.update(self.recompute.stats())
        return block_logits_from(model, h, start, end)

    def _v_verify(self, blk, layer, h, P):
        """Refresh the V of every response row; return the rows (B, k) whose V moved the most."""
        B, n = h.shape[0], h.shape[1] - P
        v_new = blk.attn.v(blk.attn_norm(h[:, P:]))  # (B, n, Hkv * D)
        cached = self.v[layer][:, :, P:]  # (B, Hkv, n, D), a view into the cache
        v_old = cached.transpose(1, 2).reshape(B, n, -1)
        similarity = F.cosine_similarity(v_new.float(), v_old.float(), dim=-1)  # (B, n)
        k = int(self.rho * n)
        # a stable sort, not topk: rows that tie (untouched mask rows are all at 1.0) must be picked
        # the same way whatever the batch around them, so the earliest rows win
        rows = similarity.sort(dim=1, stable=True).indices[:, :k].sort(dim=1).values + P
        cached.copy_(v_new.view(B, n, cached.shape[1], -1).transpose(1, 2))
        return rows

    def _attention(self, model, blk, layer, h, rows):
        """Fresh q, k, v for `rows`, their attention over all keys, o-projected into the cache.
        (V-verify rows get their v once more here: the same value V-verify just wrote.)"""
        cos, sin = self.rope
        q, k, v = blk.attn.qkv(blk.attn_norm(_take(h, rows)), (_take(cos, rows), _take(sin, rows)))
        _put(self.k[layer], rows, k)
        _put(self.v[layer], rows, v)
        y = dense_attention(q, self.k[layer], self.v[layer], self.mask, model.attention_backend)
        _put(self.attn_out[layer], rows, blk.attn.out(y))
