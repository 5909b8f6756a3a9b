"""Terminal rendering of decoding, for people who read pdllm to learn how dLLMs decode.

Each step prints the current block: masked positions as ``░``, tokens unmasked at this step in
bold, earlier ones plain. Prefilling-dLLM's selected chunks and scores print once, before.
"""

from __future__ import annotations

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"
MASK_GLYPH = "░"


def render_block(event: dict, tokenizer) -> str:
    """One line for one step: 'block b step s | the answer ░░ so far'."""
    x, s, e, new = event["x"], event["start"], event["end"], event["transfer"]
    mask_id = tokenizer.mask_id
    parts = []
    for j, tok in enumerate(x[0, s:e].tolist()):
        if tok == mask_id:
            parts.append(MASK_GLYPH)
            continue
        text = tokenizer.decode([tok], stop_at_eos=False) or "·"
        text = text.replace("\n", "⏎")
        parts.append(f"{BOLD}{text}{RESET}" if bool(new[0, j]) else text)
    return f"{DIM}block {event['block']} step {event['step']:>3}{RESET} | " + "".join(parts)


def render_selection(scores, selected, chunk_lengths) -> str:
    """The chunk table: score bar per chunk, selected ones marked."""
    lines = ["chunk  tokens  score       selected"]
    finite = [float(v) for v in scores if v == v and abs(float(v)) != float("inf")]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    for i, (score, n) in enumerate(zip(scores.tolist(), chunk_lengths)):
        frac = 0.0 if hi == lo else (score - lo) / (hi - lo)
        bar = "█" * max(1, round(frac * 10))
        mark = "  ◀ selected" if i in selected else ""
        lines.append(f"{i:>5}  {n:>6}  {score:>9.4f}  {bar:<10}{mark}")
    return "\n".join(lines)
