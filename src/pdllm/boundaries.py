"""Structure-aware chunk boundaries: cut the context at sentence, line and paragraph ends.

Fixed chunking cuts the context every ``chunk_size`` tokens, wherever that falls; a fact cut in
two lands half in one chunk and half in the next, neither scores high, and the answer is missed.
This module moves each cut to the strongest break near its fixed offset, in two steps:

1. **Break strengths.** For every context token t, the strength of a cut *after* t, from
   :data:`NONE` (inside a word, or inside a character's bytes) to :data:`PARAGRAPH`. Two ways:

   * :func:`text_breaks` from the text and the tokenizer's character offsets (``Encoding.offsets``):
     exact for any tokenizer, byte-level BPE and CJK included. This is the normal path;
     :meth:`pdllm.tokenizer.Tokenizer.long_context_prompt` fills ``LongContextPrompt.breaks`` with it.
   * :func:`token_breaks` from token ids alone (a prompt built from ids): the tokens' bytes, looked
     up in a per-vocabulary table (:func:`token_bytes`), are joined and read as one UTF-8 stream, so a
     character split over two byte tokens (a '。' is three bytes) is still found.

   Both rate the text with :func:`char_breaks`, so they agree wherever the tokens' bytes spell the
   text (byte-level BPE without a normalizer that changes break characters).

2. **Snapped spans.** :func:`snapped_spans` moves each fixed cut ``k * chunk_size`` to the strongest
   break within ``window`` tokens of it, and returns the chunks as ``(start, end)`` token spans.

Break rules (a cut at character position p, between ``text[p-1]`` and ``text[p]``):

* a newline ends a line (:data:`LINE`); after the last newline of a whitespace run that holds two or
  more, a paragraph (:data:`PARAGRAPH`). Anywhere in the whitespace after a run's last newline counts
  as that newline's break, since tokenizers differ in where they split indentation from the newline.
* ``. ! ?`` followed by whitespace, or ``。 ！ ？ ｡`` followed by anything but more punctuation, end a
  sentence (:data:`SENTENCE`), closing quotes and brackets after them included (``."`` ``。」``).
  Abbreviations ("Mr. Smith") count as sentence ends too; "3.14" and "file.py" do not.
* ``, ; :`` followed by whitespace, or ``， ； ： 、``, end a clause (:data:`CLAUSE`).
* the position just before a CJK sentence or clause mark that follows a word rates as that mark:
  byte-level BPEs with Qwen2's and Llama-3's split regex glue the mark to the next word ("。他是" is
  one pre-token), so there the cut after the mark does not exist.
* other whitespace, and the gap between two CJK ideographs or kana (scripts written without
  spaces), is a word gap (:data:`WORD`); everything else is :data:`NONE`.
* the end of the text is a :data:`PARAGRAPH` (whatever comes next starts afresh).
"""

from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from typing import Sequence

import torch

# Strength of a cut after a token (ordered: a larger one is a better place to cut).
NONE = 0  # inside a word, or between the bytes of one character
WORD = 1  # a word gap: whitespace follows, or between two CJK characters
CLAUSE = 2  # after , ; : (followed by whitespace) or ， ； ： 、
SENTENCE = 3  # after . ! ? (followed by whitespace) or 。 ！ ？ ｡, closing quotes and brackets included
LINE = 4  # after a newline
PARAGRAPH = 5  # after a blank line, and at the end of the text
STRENGTH_NAMES = ("none", "word", "clause", "sentence", "line", "paragraph")

_TERMINATORS_SPACED = ".!?"  # end a sentence only when whitespace follows ("3.14", "e.g.x" do not)
_TERMINATORS_CJK = "。！？｡"  # end a sentence whatever follows: CJK puts no space after them
_CLAUSE_MARKS_SPACED = ",;:"
_CLAUSE_MARKS_CJK = "，；：、"
# Scripts written without spaces between words: CJK ideographs (with extension A, compatibility
# ideographs and the supplementary planes' extensions), hiragana, katakana, halfwidth katakana.
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF), (0x3040, 0x30FF),
               (0x31F0, 0x31FF), (0xFF66, 0xFF9F))


# Character classes, as bits of one table entry per BMP code point.
_SPACE, _NEWLINE, _CLOSER, _TERM_SPACED, _TERM_CJK, _CLAUSE_SPACED, _CLAUSE_CJK, _CJK = (1 << i for i in range(8))
_PUNCT = _TERM_SPACED | _TERM_CJK | _CLAUSE_SPACED | _CLAUSE_CJK


@lru_cache(maxsize=1)
def _class_table() -> torch.Tensor:
    """The class bits of every code point below U+10000 (uint8), from str and unicodedata; above it
    only the CJK ideograph planes have a class, which :func:`_classes_of` adds."""
    table = bytearray(0x10000)
    for c in range(0x3001):  # every whitespace and line-break character lies below U+3001 (ideographic space)
        if chr(c).isspace():
            table[c] |= _SPACE
        # line breaks as str.splitlines sees them; "\r" is handled apart (one break for "\r\n")
        if c != 0x0D and len(("a" + chr(c) + "b").splitlines()) == 2:
            table[c] |= _NEWLINE
    # Closing brackets and final quotes (Pe, Pf), plus the straight quotes that close as often as open.
    for c in [*(c for c in range(0x10000) if unicodedata.category(chr(c)) in ("Pe", "Pf")), ord('"'), ord("'")]:
        table[c] |= _CLOSER
    for chars, bit in ((_TERMINATORS_SPACED, _TERM_SPACED), (_TERMINATORS_CJK, _TERM_CJK),
                       (_CLAUSE_MARKS_SPACED, _CLAUSE_SPACED), (_CLAUSE_MARKS_CJK, _CLAUSE_CJK)):
        for ch in chars:
            table[ord(ch)] |= bit
    for lo, hi in _CJK_RANGES:
        for c in range(lo, min(hi, 0xFFFF) + 1):
            table[c] |= _CJK
    return torch.frombuffer(table, dtype=torch.uint8)


def _classes_of(cp: torch.Tensor) -> torch.Tensor:
    cls = _class_table()[cp.clamp(max=0xFFFF)]
    astral = (cp >= 0x20000) & (cp <= 0x3FFFF)  # ideograph extensions B and beyond
    return torch.where(cp > 0xFFFF, torch.where(astral, _CJK, 0).to(torch.uint8), cls)


def _code_points(text: str) -> torch.Tensor:
    # surrogatepass: token_breaks reads invalid UTF-8 bytes as lone surrogates (surrogateescape).
    return torch.frombuffer(bytearray(text.encode("utf-32-le", "surrogatepass")), dtype=torch.int32).long()


def char_breaks(text: str) -> torch.Tensor:
    """Strength of a cut at each character position of ``text``: an int8 tensor of ``len(text) + 1``,
    where entry p rates a cut between ``text[p-1]`` and ``text[p]`` (the rules are in the module doc).
    Entry 0 is NONE (nothing before it), entry ``len(text)`` PARAGRAPH (the end of the text)."""
    n = len(text)
    out = torch.zeros(n + 1, dtype=torch.int8)
    out[n] = PARAGRAPH
    if n < 2:
        return out
    cp = _code_points(text)
    cls = _classes_of(cp)
    has = lambda bits, c=cls: (c & bits) != 0  # noqa: E731
    space, closer = has(_SPACE), has(_CLOSER)
    newline = has(_NEWLINE)
    newline[:-1] |= (cp[:-1] == 0x0D) & (cp[1:] != 0x0A)  # a lone "\r"
    newline[-1] |= bool(cp[-1] == 0x0D)
    idx = torch.arange(n)
    nl_cum = torch.zeros(n + 1, dtype=torch.long)
    nl_cum[1:] = newline.long().cumsum(0)  # nl_cum[p]: newlines in text[:p]
    # The class of the last character at or before i that is not a closer (0: none), so that a run of
    # closing quotes and brackets is looked through to the punctuation mark before it.
    last_open = torch.where(closer, -1, idx).cummax(0).values
    mark = torch.where(last_open >= 0, cls[last_open.clamp(min=0)], 0)
    # end_strength[i]: the break after a non-space text[i] when whitespace follows it.
    end_strength = torch.where(has(_TERM_SPACED | _TERM_CJK, mark), SENTENCE,
                               torch.where(has(_CLAUSE_SPACED | _CLAUSE_CJK, mark), CLAUSE, WORD)).to(torch.int8)

    # Interior positions p = 1 .. n-1: the left character is text[p-1] (slices [:-1]), the right text[p] ([1:]).
    left_space, right_space = space[:-1], space[1:]

    # Left is whitespace: p lies in (or at the end of) a whitespace run text[a:b].
    a = torch.where(space, -1, idx).cummax(0).values[:-1] + 1
    b = torch.where(space, n, idx).flip(0).cummin(0).values.flip(0)[1:]
    here = nl_cum[1:n]
    nl_before, nl_after, nl_run = here - nl_cum[a], nl_cum[b] - here, nl_cum[b] - nl_cum[a]
    text_before = torch.where(a > 0, end_strength[(a - 1).clamp(min=0)], WORD)
    at_newline = torch.where((nl_after == 0) & (nl_run >= 2), PARAGRAPH, LINE)
    in_run = torch.where(nl_before == 0, text_before, at_newline)

    # Left is text, right is whitespace: the text before p ends here.
    # Both are text: only CJK punctuation (no space after it) and CJK letters give a break, and only
    # where the punctuation run has ended ("。」" cuts after the bracket, "！？" after the "？").
    left_mark, right_cls = mark[:-1], cls[1:]
    run_ended = ~has(_PUNCT | _CLOSER, right_cls)
    glued = torch.where(has(_TERM_CJK, left_mark) & run_ended, SENTENCE,
                        torch.where(has(_CLAUSE_CJK, left_mark) & run_ended, CLAUSE,
                                    torch.where(has(_CJK, cls[:-1]) & has(_CJK, right_cls), WORD, NONE)))
    # Just before a CJK sentence or clause mark that follows a word: the split regexes of Qwen2 and
    # Llama-3 glue one punctuation mark to the letters after it ("。他是" is one pre-token), so with
    # their tokenizers this is often the only cut near the end of a CJK sentence. It keeps the
    # sentence's words together; the mark itself carries nothing.
    after_word = ~has(_PUNCT | _CLOSER, cls[:-1])
    glued = torch.where(after_word & has(_TERM_CJK, right_cls), SENTENCE,
                        torch.where(after_word & has(_CLAUSE_CJK, right_cls), CLAUSE, glued))
    out[1:n] = torch.where(left_space, in_run, torch.where(right_space, end_strength[:-1], glued))
    return out


def text_breaks(text: str, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Break strength after each token of ``text``'s encoding (path a): an int8 tensor, one per token.

    ``offsets``: the tokens' (start, end) character offsets, as ``tokenizers`` ``Encoding.offsets``
    gives them. A cut between two tokens whose offsets overlap falls inside one character (a
    byte-level tokenizer gives every byte token of a character that character's offsets): NONE.
    Characters no token covers (a pre-tokenizer that drops whitespace) count for the cut around them.
    """
    n = len(offsets)
    if n == 0:
        return torch.zeros(0, dtype=torch.int8)
    chars = char_breaks(text)
    off = torch.tensor(offsets, dtype=torch.long).reshape(n, 2)
    lo = off[:, 1]  # the cut after token t lies between its end and the next token's start
    hi = torch.cat([off[1:, 0], torch.tensor([len(text)])])
    out = torch.where(hi >= lo, chars[lo.clamp(0, len(text))], torch.zeros((), dtype=torch.int8))
    gaps = torch.nonzero(hi > lo).flatten()
    if len(gaps):
        c, lo, hi = chars.tolist(), lo.tolist(), hi.tolist()
        out[gaps] = torch.tensor([max(c[lo[t]:hi[t] + 1]) for t in gaps.tolist()], dtype=torch.int8)
    return out


def _decoder_types(tokenizer) -> set[str]:
    def walk(d):
        yield d.get("type")
        for sub in d.get("decoders") or ():
            yield from walk(sub)

    state = tokenizer.decoder.__getstate__() if tokenizer.decoder is not None else b"{}"
    return set(walk(json.loads(state)))


@lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """The ByteLevel alphabet's character -> byte map (GPT-2's): printable bytes stand for themselves,
    the others, in byte order, for the alphabet's characters above U+00FF, in order."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    own = {ord(c) for c in alphabet if ord(c) < 256}
    moved = sorted(ord(c) for c in alphabet if ord(c) >= 256)
    rest = [b for b in range(256) if b not in own]
    return {chr(b): b for b in own} | {chr(c): b for c, b in zip(moved, rest)}


_TABLES: dict[int, tuple[object, list[bytes], torch.Tensor]] = {}


def token_bytes(tokenizer) -> tuple[list[bytes], torch.Tensor]:
    """The bytes each id of ``tokenizer`` (a ``tokenizers.Tokenizer``) stands for, and their lengths.

    Byte-level BPE (a ByteLevel decoder): the token string read through the ByteLevel alphabet, which
    is exact, partial UTF-8 characters included. Other tokenizers: the text the id adds when decoded
    after an ordinary token (so SentencePiece's "▁" and WordPiece's "##" give their spaces right),
    which loses bytes that are not whole characters (byte-fallback pieces of one character).
    Added tokens: their content. Built once per tokenizer object and kept (8 at most).
    """
    hit = _TABLES.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1], hit[2]
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    table = [b""] * size
    if "ByteLevel" in _decoder_types(tokenizer):
        chars = _byte_level_chars()
        for token, i in vocab.items():
            table[i] = bytes(chars[c] for c in token) if all(c in chars for c in token) else token.encode("utf-8")
    else:
        # A plain word before each id, cut off again, keeps the space a decoder strips at the start.
        anchor = min((i for t, i in vocab.items() if t.isascii() and t.isalpha()), default=None)
        head = tokenizer.decode([anchor], skip_special_tokens=False) if anchor is not None else ""
        ids = sorted(vocab.values())
        lead = [anchor] if anchor is not None else []
        for i, text in zip(ids, tokenizer.decode_batch([lead + [i] for i in ids], skip_special_tokens=False)):
            table[i] = (text[len(head):] if text.startswith(head) else text).encode("utf-8")
    for i, added in tokenizer.get_added_tokens_decoder().items():
        table[i] = added.content.encode("utf-8")
    lengths = torch.tensor([len(b) for b in table], dtype=torch.long)
    if len(_TABLES) >= 8:
        _TABLES.clear()
    _TABLES[id(tokenizer)] = (tokenizer, table, lengths)  # holds a reference: the id stays this tokenizer's
    return table, lengths


def token_breaks(ids: Sequence[int], tokenizer) -> torch.Tensor:
    """Break strength after each token of ``ids`` (path b), from the vocabulary alone: an int8 tensor.

    The tokens' bytes (:func:`token_bytes`) are joined and decoded as one UTF-8 stream, so a character
    split over several byte tokens is whole again; a cut between such tokens is NONE. Bytes that are
    no valid UTF-8 (a context that starts or ends inside a character) stand for themselves, one
    character each, and break nothing. Agrees with :func:`text_breaks` wherever the tokens' bytes
    spell the encoded text.
    """
    ids = [int(i) for i in ids]
    if not ids:
        return torch.zeros(0, dtype=torch.int8)
    table, lengths = token_bytes(tokenizer)
    if min(ids) < 0 or max(ids) >= len(table):
        raise ValueError(f"token id out of range 0..{len(table) - 1} of this tokenizer")
    text = b"".join(map(table.__getitem__, ids)).decode("utf-8", "surrogateescape")
    chars = char_breaks(text)
    cp = _code_points(text)
    # UTF-8 length of each character; an escaped byte (a lone surrogate) is one byte.
    surrogate = (cp >= 0xD800) & (cp <= 0xDFFF)
    char_len = 1 + (cp >= 0x80).long() + (cp >= 0x800).long() + (cp >= 0x10000).long() - 2 * surrogate.long()
    char_start = torch.cat([torch.zeros(1, dtype=torch.long), char_len.cumsum(0)])  # byte offset of each position
    cut = lengths[torch.tensor(ids)].cumsum(0)  # byte offset of the cut after each token
    pos = torch.searchsorted(char_start, cut).clamp(max=len(text))
    return torch.where(char_start[pos] == cut, chars[pos], torch.zeros((), dtype=torch.int8))


def snapped_spans(n_tokens: int, chunk_size: int, strengths, window: int,
                  max_len: int | None = None) -> list[tuple[int, int]]:
    """Chunks of a context of ``n_tokens`` tokens as ``[(start, end), ...]``, cut at breaks near the
    fixed offsets.

    Fixed chunking cuts at ``k * chunk_size`` (k = 1 .. ceil(n_tokens / chunk_size) - 1). Here each cut
    moves to the strongest break within ``window`` tokens of its target (``strengths[t]`` rates a cut
    after token t, so a cut at position c is rated ``strengths[c - 1]``); ties go to the cut nearest
    the target, then to the earlier one. Where no break of at least WORD strength lies in the window,
    the cut stays at its target. A cut also stays within ``max_len`` tokens of the previous cut.

    Guarantees (checked before returning):

    * the spans cover [0, n_tokens) contiguously, in order, and there are exactly as many as fixed
      chunking gives (ceil(n_tokens / chunk_size));
    * no span is empty: cuts are strictly increasing, since each lies within ``window`` of its target
      and ``2 * window < chunk_size`` keeps neighbouring windows apart;
    * no span is longer than ``max_len`` (default ``chunk_size + window``): the first span ends by
      ``chunk_size + window``, the last starts after ``n - chunk_size - window``, and every cut is held
      within ``max_len`` of the one before; the target is always allowed, as the previous cut is at
      least ``target - chunk_size - window``. It holds with no break anywhere (one huge line);
    * ``window=0`` gives exactly the fixed chunks.

    A ``max_len`` of ``chunk_size + 2 * window`` or more never holds a cut back (each cut then simply
    takes the best break in its own window).
    """
    for name, v in (("n_tokens", n_tokens), ("chunk_size", chunk_size), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}={v!r} must be an int")
    max_len = chunk_size + window if max_len is None else max_len
    if n_tokens < 0 or chunk_size < 1 or window < 0 or 2 * window >= chunk_size or max_len < chunk_size + window:
        raise ValueError(f"snapped_spans needs n_tokens >= 0, chunk_size >= 1, 0 <= window < chunk_size / 2 (so that "
                         f"neighbouring cuts' windows never overlap and no span can be empty) and max_len >= "
                         f"chunk_size + window (so that every cut's target stays allowed); got n_tokens={n_tokens}, "
                         f"chunk_size={chunk_size}, window={window}, max_len={max_len}")
    s = torch.as_tensor(strengths).long().flatten()
    if len(s) != n_tokens:
        raise ValueError(f"strengths has {len(s)} entries for {n_tokens} tokens (one per token: a cut after it)")
    n_spans = -(-n_tokens // chunk_size)
    if n_spans <= 1:
        return [(0, n_tokens)] if n_tokens else []
    targets = torch.arange(1, n_spans) * chunk_size
    shift = torch.arange(-window, window + 1)
    cand = targets[:, None] + shift[None, :]  # >= 1 since window < chunk_size
    ok = cand <= n_tokens - 1
    rated = s[(cand - 1).clamp(max=n_tokens - 1)]
    # Strongest first, then nearest the target, then earlier: one integer key, -1 where not allowed.
    key = rated * (2 * window + 2) + (2 * window - 2 * shift.abs() - (shift > 0).long())
    key = torch.where(ok & (rated >= WORD), key, -1)
    best = key.argmax(1)
    free_cut = torch.where(key.max(1).values >= 0, cand.gather(1, best[:, None]).squeeze(1), targets).tolist()

    cuts, prev = [], 0
    for k, c in enumerate(free_cut):
        if c - prev > max_len:  # held back by the previous cut: the best break left in reach
            reach = torch.where(cand[k] <= prev + max_len, key[k], -1)
            c = int(cand[k, reach.argmax()]) if int(reach.max()) >= 0 else int(targets[k])
        cuts.append(c)
        prev = c
    bounds = [0, *cuts, n_tokens]
    spans = list(zip(bounds[:-1], bounds[1:]))
    lengths = [e - b for b, e in spans]
    if len(spans) != n_spans or min(lengths) < 1 or max(lengths) > max_len:
        raise RuntimeError(f"snapped_spans broke its guarantees: {n_spans} spans expected, lengths "
                           f"{min(lengths)}..{max(lengths)} (1..{max_len} allowed)")
    return spans


__all__ = ["NONE", "WORD", "CLAUSE", "SENTENCE", "LINE", "PARAGRAPH", "STRENGTH_NAMES", "char_breaks", "text_breaks",
           "token_bytes", "token_breaks", "snapped_spans"]
