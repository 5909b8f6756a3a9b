"""Prefilling-dLLM: chunked prefilling with BOS anchors, chunk scoring, top-K selection, token
sparsity, and decoding against the selected chunks' KV (arXiv 2606.10537).

The method, in the order it runs (``Prefill.begin``, method.py), one stage per step, each a
registry entry a fork can add to (stages.py says how):

1. **Chunking with BOS anchors** (chunkers.py, ``chunking``). The context is cut into spans of
   ``chunk_size`` tokens and a BOS token is put in front of every chunk, so each chunk carries its
   own attention sink wherever it is placed later. Where the cuts fall decides whether a fact is
   cut in two: pdllm's default chunks overlap their neighbours by a sentence's length
   (``overlap``); ``snapped`` moves each cut to a sentence or line end; ``bos_added`` cuts at the
   fixed offsets; the official code's ``bos_in_chunk`` lets the BOS take one of the rows.
2. **Scoring**, once, streamed chunk by chunk (memory O(chunk x score_batch) whatever the context
   length), the chunks of every request of a batch sharing forwards (``score``): ``attention``
   (scorers.py) reads the attention the query and the masked answer slots give each chunk in the
   last layers, optionally exiting early (``score_depth``); ``draft`` (draft.py) scores how likely
   each chunk makes a draft answer decoded without the context (the official code's).
3. **Selection** (selectors.py, ``selection``): the K best chunks (``top_k``), kept in document
   order.
4. **Token sparsity** (optional, ``token_capacity``): inside each kept chunk, the rows the query
   attends to most (SnapKV-style pooling), the BOS anchor always.
5. **Layout and cache build** (layout.py, cache_build.py, ``positions``, ``cache_mode``): where
   each kept row sits and its position id (chunks packed, at the positions they were encoded at,
   or at their original place), then the pool: ``full_prompt_mask`` re-encodes prefix + kept
   chunks + query (+ the masked answer) jointly at each block start; ``chunk_query`` encodes each
   chunk once against the prefix and the last query tokens, or reads the K/V its full-depth
   scoring forward already computed (``encode_once``).
6. **Decoding**: the sampler's steps run the answer block against the pool of prefix + kept
   chunks + query + answer (``ChunkKVCache``), through the Triton kernel on a GPU.

With ``chunk_bos=False``, every chunk selected, ``full_prompt_mask`` and ``absolute`` positions,
this is exactly the dense dual cache (tests/test_prefill.py proves it). Across GPUs: chunk-parallel
scoring (parallel.py) and prefill-decode disaggregation (record.py, ``run_prefill`` /
``decode_record``).
"""

from pdllm.prefill import cache_build, cascade, chunkers, draft, scorers, selectors  # noqa: F401  (register the stages)
from pdllm.prefill.config import PrefillConfig
from pdllm.prefill.layout import Layout, build_layout
from pdllm.prefill.method import Prefill, decode_record, run_prefill
from pdllm.prefill.record import PrefillRecord, load_record, recv_record, save_record, send_record
from pdllm.prefill.stages import CACHE_BUILDERS, CHUNKERS, SCORERS, SELECTORS, Chunked, Span, Stage

__all__ = ["Prefill", "PrefillConfig", "Layout", "build_layout", "Span", "Chunked", "Stage", "CHUNKERS", "SCORERS",
           "SELECTORS", "CACHE_BUILDERS", "PrefillRecord", "run_prefill", "decode_record", "save_record",
           "load_record", "send_record", "recv_record"]
