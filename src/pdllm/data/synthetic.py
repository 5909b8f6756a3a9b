"""Synthetic long-context retrieval tasks, generated from a seed (no downloads).

Three tasks, after the usual long-context probes (passkey retrieval, RULER's multi-key
needle-in-a-haystack, key-value lookup):

* ``passkey``: a haystack of generated sentences with one needle
  "The pass key is 48213. Remember it. 48213 is the pass key." at a chosen depth.
* ``multikey_needle``: several needles "One of the special magic numbers for <key> is: <7 digits>."
  with different word keys; some are *distractors* whose key shares one word with the asked key.
  The question asks for one key.
* ``kv_lookup``: no prose, only lines "<key>: <value>"; the question asks for one key's value.

Lengths are measured in tokens of a given tokenizer (normally the toy tokenizer of
:mod:`pdllm.data.toy_tokenizer`). A context is a concatenation of *pieces* (sentences or lines,
each with its leading separator), and the tokenizer splits digits and pre-tokenizes on
whitespace before merging, so a context's token ids are exactly the concatenation of its pieces'
ids. :class:`PieceEncoder` uses that to encode each distinct piece once, which makes generation
cheap enough to feed training on the fly; ``example.context_ids`` holds the result and equals
``tokenizer.encode(example.context).ids`` (tested).

Depth: a needle's depth is the fraction of the *other* context tokens that lie before it, so 0
puts it first and 1 last. ``needle_depths`` holds the measured depths, the answer-bearing needle
first; ``depth`` holds the requested one. Haystack sentences are drawn from a fixed pool of
grammar-generated sentences (:func:`haystack_pool`), in an order set by the example's seed.
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, Sequence

TASKS = ("passkey", "multikey_needle", "kv_lookup")

# ---------------------------------------------------------------------------------------------
# Word lists. Haystack words never include "key", "pass", "magic", "number", "value" or digits,
# so a needle is the only place an answer can come from.
# ---------------------------------------------------------------------------------------------

_AGENTS = """farmer sailor baker painter teacher doctor merchant soldier poet gardener miller weaver
hunter fisher scholar widow shepherd tailor carpenter priest singer dancer clerk nurse pilot
traveler stranger captain cook knight queen prince thief monk judge mayor boy girl child woman man
fox crow horse dog cat owl goat wolf bear heron""".split()
_THINGS = """basket lantern letter coat rope cart bell book map ladder barrel blanket candle kettle
hammer shovel bucket wagon boat drum flute mirror ring scarf sword shield saddle net cloak jar
bottle chair table door window fence gate bridge wheel stone feather apple bread cheese onion
cabbage loaf coin hat boot glove quilt""".split()
_PLACES = """market harbor village forest river valley hill meadow orchard castle chapel tavern
library bakery garden field road square tower mill dock shore cliff cave island lake marsh
courtyard kitchen cellar attic stable barn workshop station cottage inn""".split()
_ADJECTIVES = """old quiet small large red green blue yellow heavy light bright dark warm cold wet
dry gentle rough tall short narrow wide ancient broken shiny dusty empty crowded silent noisy
patient careful clever tired hungry cheerful lonely proud humble curious brave shy sleepy strange
famous wooden golden silver""".split()
# (past tense, base form), all transitive.
_VERBS = [
    ("carried", "carry"), ("painted", "paint"), ("found", "find"), ("lost", "lose"),
    ("mended", "mend"), ("sold", "sell"), ("bought", "buy"), ("cleaned", "clean"),
    ("hid", "hide"), ("moved", "move"), ("watched", "watch"), ("opened", "open"),
    ("closed", "close"), ("borrowed", "borrow"), ("returned", "return"), ("dropped", "drop"),
    ("lifted", "lift"), ("pushed", "push"), ("pulled", "pull"), ("washed", "wash"),
    ("polished", "polish"), ("guarded", "guard"), ("traded", "trade"), ("stole", "steal"),
    ("built", "build"), ("forgot", "forget"), ("noticed", "notice"), ("admired", "admire"),
    ("counted", "count"), ("packed", "pack"), ("shared", "share"), ("threw", "throw"),
]
_ADVERBS = """slowly quickly quietly carefully gladly sadly early late often rarely suddenly
gently proudly calmly eagerly happily patiently loudly softly bravely""".split()
_TIMES = """in the morning|at dawn|at noon|in the evening|at night|after the storm|before the
rain|during the feast|on the first day of spring|late in the autumn|in the middle of winter|long
ago|the next day|at sunset|before supper|after the harvest|at the end of the week""".replace(
    "\n", " "
).split("|")
_PREPS = "near|inside|behind|beside|across|under|above|outside|toward|beyond".split("|")
_DAYS = "morning|evening|spring|summer|winter|autumn|week|month|season|night".split("|")

# Key words for needle keys: prefix-free and suffix-free within each list, so "<adj>-<noun>"
# appears in a context only where that exact key was written.
KEY_ADJECTIVES = """abundant adorable agreeable amused ancient anxious aromatic bashful bitter
blushing boundless breezy bumpy calm chilly clumsy cozy crisp crunchy dainty dazzling delightful
dizzy eager elegant fancy fierce fluffy fragile frosty fuzzy giant glossy graceful grumpy hollow
husky icy jolly zany lavish lively lucky mellow misty modest nimble noble odd peppy polite
purple quaint rapid rustic scarlet shaggy silky sleek snowy sparkling smoky spotted sturdy
swift tangy tender thirsty tiny velvet vivid wandering witty zealous zesty wobbly fearless
hushed""".split()
KEY_NOUNS = """acorn alpaca anchor badger banjo beetle blossom bobcat buffalo cactus canoe
carrot cheetah chestnut cobra comet cricket dolphin donkey dragon eagle falcon ferret flamingo
gazelle gecko giraffe glacier gorilla harp hedgehog iguana jaguar kiwi koala lemur lobster
magnet mango meadowlark moose muffin narwhal octopus ostrich otter panda parrot peach pelican
penguin pepper pumpkin quokka raccoon radish salmon sardine seal sparrow squid tiger toucan
tulip turnip violin walrus whale yak zebra bison crayon""".split()

_HEX = "0123456789abcdef"

# ---------------------------------------------------------------------------------------------
# Haystack grammar
# ---------------------------------------------------------------------------------------------


def _a(rng: random.Random, words: Sequence[str]) -> str:
    return words[rng.randrange(len(words))]


def _templates() -> list[Callable[[random.Random], str]]:
    A, T, P, J, V, D = _AGENTS, _THINGS, _PLACES, _ADJECTIVES, _VERBS, _ADVERBS
    return [
        lambda r: f"The {_a(r, J)} {_a(r, A)} {_a(r, V)[0]} a {_a(r, J)} {_a(r, T)} {_a(r, _PREPS)} the {_a(r, P)}.",
        lambda r: f"{_a(r, _TIMES).capitalize()}, the {_a(r, A)} {_a(r, V)[0]} the {_a(r, T)} {_a(r, D)}.",
        lambda r: f"Nobody expected the {_a(r, A)} to {_a(r, V)[1]} the {_a(r, T)} so {_a(r, D)}.",
        lambda r: f"In the {_a(r, P)}, a {_a(r, J)} {_a(r, A)} {_a(r, D)} {_a(r, V)[0]} an old {_a(r, T)}.",
        lambda r: f"The {_a(r, A)} and the {_a(r, A)} {_a(r, V)[0]} the {_a(r, T)} {_a(r, _PREPS)} the {_a(r, P)} {_a(r, _TIMES)}.",
        lambda r: f"It was said that the {_a(r, T)} {_a(r, _PREPS)} the {_a(r, P)} was {_a(r, J)} and {_a(r, J)}.",
        lambda r: f"Every {_a(r, _DAYS)} the {_a(r, A)} would {_a(r, V)[1]} a {_a(r, T)} and walk to the {_a(r, P)}.",
        lambda r: f"\"Where is my {_a(r, T)}?\" asked the {_a(r, J)} {_a(r, A)}.",
        lambda r: f"The {_a(r, P)} was {_a(r, J)} {_a(r, _TIMES)}, and the {_a(r, A)} felt {_a(r, J)}.",
        lambda r: f"A {_a(r, J)} {_a(r, T)} lay {_a(r, _PREPS)} the {_a(r, P)}, and no {_a(r, A)} dared to {_a(r, V)[1]} it.",
        lambda r: f"Some say the {_a(r, A)} once {_a(r, V)[0]} every {_a(r, T)} in the {_a(r, P)}.",
        lambda r: f"When the {_a(r, A)} came back from the {_a(r, P)}, the {_a(r, T)} was gone.",
    ]


_TEMPLATES = _templates()
_AN = re.compile(r"\b([Aa]) (?=[aeiou])")  # "a old" -> "an old"


def haystack_sentence(rng: random.Random) -> str:
    """One grammar sentence (no digits, no needle words)."""
    return _AN.sub(r"\1n ", _TEMPLATES[rng.randrange(len(_TEMPLATES))](rng))


@lru_cache(maxsize=4)
def haystack_pool(pool_seed: int = 0, size: int = 16384) -> tuple[str, ...]:
    """A fixed pool of distinct haystack sentences; examples draw from it in seeded order.

    A pool (rather than fresh sentences) lets :class:`PieceEncoder` encode each sentence once.
    16K distinct sentences, drawn with replacement, make a 1K-token context (about 70 sentences)
    practically never repeat and give the model no fixed positions to memorise.
    """
    rng = random.Random(f"haystack-pool:{pool_seed}")
    seen: dict[str, None] = {}
    while len(seen) < size:
        seen.setdefault(haystack_sentence(rng), None)
    return tuple(seen)


# ---------------------------------------------------------------------------------------------
# Token counting
# ---------------------------------------------------------------------------------------------

_DIGIT_SPLIT = re.compile(r"([0-9])")
_APPROX_TOKEN = re.compile(r"[0-9]|[A-Za-z]+|[^\sA-Za-z0-9]|\n")


class PieceEncoder:
    """Encodes text pieces with a memo, treating each ASCII digit as its own token.

    Exact for tokenizers whose first pre-tokenizer splits individual digits (the toy tokenizer):
    there, encoding ``"ab 12 cd"`` equals encoding ``"ab "``, ``"1"``, ``"2"``, ``" cd"`` apart and
    concatenating, so numbers never miss the memo. With ``tokenizer=None`` it only estimates
    (one token per word, digit or punctuation mark) and returns no ids.
    """

    def __init__(self, tokenizer=None, max_cache: int = 200_000):
        self.tokenizer = tokenizer
        self.max_cache = max_cache
        self._cache: dict[str, list[int]] = {}
        self._digit_ids: list[int] | None = None
        if tokenizer is not None:
            ids = [tokenizer.encode(str(d), add_special_tokens=False).ids for d in range(10)]
            if all(len(i) == 1 for i in ids):
                self._digit_ids = [i[0] for i in ids]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("PieceEncoder(None) only counts; it has no ids")
        if self._digit_ids is None:  # not a digit-splitting tokenizer: no piecewise shortcut
            return self._encode_cached(text)
        out: list[int] = []
        for seg in _DIGIT_SPLIT.split(text):
            if not seg:
                continue
            if len(seg) == 1 and "0" <= seg <= "9":
                out.append(self._digit_ids[ord(seg) - 48])
            else:
                out.extend(self._encode_cached(seg))
        return out

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(_APPROX_TOKEN.findall(text))
        return len(self.encode(text))

    def _encode_cached(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            if len(self._cache) >= self.max_cache:
                self._cache.clear()
            ids = self._cache[text] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids


_ENCODERS: dict[int, PieceEncoder] = {}


def piece_encoder(tokenizer) -> PieceEncoder:
    """The shared :class:`PieceEncoder` of ``tokenizer`` (a PieceEncoder passes through)."""
    if isinstance(tokenizer, PieceEncoder):
        return tokenizer
    enc = _ENCODERS.get(id(tokenizer))
    if enc is None or enc.tokenizer is not tokenizer:
        if len(_ENCODERS) >= 8:
            _ENCODERS.clear()
        enc = _ENCODERS[id(tokenizer)] = PieceEncoder(tokenizer)  # holds a reference: ids stay unique
    return enc


# ---------------------------------------------------------------------------------------------
# The example record and the assembly of a context
# ---------------------------------------------------------------------------------------------


@dataclass
class SyntheticExample:
    """One generated task: the context text with its needles, the question and the answer (text;
    eval.examples.BenchmarkExample is a benchmark's record, tokenizer.LongContextPrompt the ids)."""

    task: str
    context: str
    question: str
    answer: str
    needle_depths: list[float]  # measured; [0] is the needle that holds the answer
    context_tokens: int  # exact with a tokenizer, else an estimate
    needle_span: tuple[int, int] = (0, 0)  # [start, end) token offsets of the answer needle in the context
    target_tokens: int = 0
    depth: float = 0.0  # requested depth of the answer needle
    key: str | None = None  # the asked key (multikey_needle, kv_lookup)
    seed: str = ""
    context_ids: list[int] | None = field(default=None, repr=False)


@dataclass
class _Needle:
    text: str
    depth: float


def _assemble(
    enc: PieceEncoder,
    filler: Iterator[str],
    needles: list[_Needle],
    target_tokens: int,
    rng: random.Random,
    sep: Callable[[random.Random], str],
) -> tuple[str, list[int] | None, int, list[float], tuple[int, int]]:
    """Fill ``target_tokens`` with filler pieces and place each needle at its depth.

    Every piece carries a leading separator; the context's first piece loses it, so a needle at
    depth 0 opens the context. Returns (text, ids or None, token count, measured depth of each
    needle, token span of the answer needle).
    """
    needle_pieces = [sep(rng) + n.text for n in needles]
    budget = target_tokens - sum(enc.count(p) for p in needle_pieces)
    fill: list[str] = []
    fill_counts: list[int] = []
    total = 0
    while True:
        piece = sep(rng) + next(filler)
        n = enc.count(piece)
        if total + n / 2 > budget and fill:
            break
        fill.append(piece)
        fill_counts.append(n)
        total += n
        if total >= budget:
            break
    # Place the needles one at a time, the answer needle (index 0) last, each at the boundary
    # nearest its depth counted over everything already placed: the answer needle's measured
    # depth is then within half a piece of the request, whatever the other needles do.
    units: list[tuple[str, int, int]] = [(p, n, -1) for p, n in zip(fill, fill_counts)]
    for i in reversed(range(len(needles))):
        cum = [0]
        for _, n, _ in units:
            cum.append(cum[-1] + n)
        goal = min(max(needles[i].depth, 0.0), 1.0) * cum[-1]
        k = bisect.bisect_left(cum, goal)
        if k == len(cum) or (k > 0 and goal - cum[k - 1] <= cum[k] - goal):
            k -= 1
        units.insert(k, (needle_pieces[i], enc.count(needle_pieces[i]), i))
    pieces = [u[0] for u in units]
    needle_at = {u[2]: j for j, u in enumerate(units) if u[2] >= 0}  # needle index -> piece index
    pieces[0] = pieces[0].lstrip()
    text = "".join(pieces)
    if enc.tokenizer is None:
        counts = [enc.count(p) for p in pieces]
        ids = None
    else:
        piece_ids = [enc.encode(p) for p in pieces]
        counts = [len(p) for p in piece_ids]
        ids = [t for p in piece_ids for t in p]
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    n_tok = starts[-1]
    depths = []
    for i in range(len(needles)):
        j = needle_at[i]
        rest = n_tok - counts[j]
        depths.append(starts[j] / rest if rest > 0 else 0.0)
    j = needle_at[0]
    lead = 0  # the needle starts after its separator's own tokens: a cut there cuts nothing of it
    if enc.tokenizer is not None:
        while lead < counts[j] - 1 and not enc.tokenizer.decode(piece_ids[j][lead : lead + 1]).strip():
            lead += 1
    span = (starts[j] + lead, starts[j + 1])
    return text, ids, n_tok, depths, span


def _prose_sep(rng: random.Random) -> str:
    return "\n\n" if rng.random() < 0.15 else " "


def _pool_filler(rng: random.Random, pool: Sequence[str]) -> Iterator[str]:
    while True:
        yield pool[rng.randrange(len(pool))]


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(1, 10)) + "".join(str(rng.randrange(10)) for _ in range(n - 1))


def _word_key(rng: random.Random, words: int = 2) -> str:
    parts = [_a(rng, KEY_ADJECTIVES)] + [_a(rng, KEY_NOUNS) for _ in range(words - 1)]
    return "-".join(parts)


def _uuid_key(rng: random.Random) -> str:
    return "".join(_a(rng, _HEX) for _ in range(8)) + "-" + "".join(_a(rng, _HEX) for _ in range(4))


def passkey_needle(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def magic_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


QUESTIONS = {
    "passkey": "What is the pass key?",
    "multikey_needle": "What is the special magic number for {key}?",
    "kv_lookup": "What is the value of the key {key}?",
}


def _make_passkey(rng, enc, target, depth, *, passkey_digits: int = 5, pool_seed: int = 0, **_):
    answer = _digits(rng, passkey_digits)
    text, ids, n, depths, span = _assemble(
        enc, _pool_filler(rng, haystack_pool(pool_seed)), [_Needle(passkey_needle(answer), depth)], target, rng, _prose_sep
    )
    return dict(context=text, context_ids=ids, context_tokens=n, needle_depths=depths, needle_span=span, answer=answer,
                question=QUESTIONS["passkey"], key=None)


def _make_multikey(rng, enc, target, depth, *, num_needles: int = 4, num_distractors: int = 2,
                   value_digits: int = 7, pool_seed: int = 0, **_):
    """``num_needles`` needles with unrelated keys (the asked one included) and
    ``num_distractors`` more whose keys share the adjective or the noun of the asked key."""
    if num_needles < 1:
        raise ValueError("num_needles must be >= 1")
    key = _word_key(rng)
    adj, noun = key.split("-")
    keys = [key]
    used = {key}
    while len(keys) < num_needles:
        k = _word_key(rng)
        if k not in used and adj not in k.split("-") and noun not in k.split("-"):
            keys.append(k)
            used.add(k)
    for i in range(num_distractors):
        for _attempt in range(1000):
            k = f"{adj}-{_a(rng, KEY_NOUNS)}" if i % 2 == 0 else f"{_a(rng, KEY_ADJECTIVES)}-{noun}"
            if k not in used:
                break
        keys.append(k)
        used.add(k)
    values: list[str] = []
    while len(values) < len(keys):
        v = _digits(rng, value_digits)
        if v not in values:
            values.append(v)
    needles = [_Needle(magic_needle(keys[0], values[0]), depth)]
    needles += [_Needle(magic_needle(k, v), rng.random()) for k, v in zip(keys[1:], values[1:])]
    text, ids, n, depths, span = _assemble(
        enc, _pool_filler(rng, haystack_pool(pool_seed)), needles, target, rng, _prose_sep
    )
    return dict(context=text, context_ids=ids, context_tokens=n, needle_depths=depths, needle_span=span, answer=values[0],
                question=QUESTIONS["multikey_needle"].format(key=key), key=key)


def _make_kv(rng, enc, target, depth, *, key_style: str = "words", value_digits: int = 6, **_):
    if key_style == "words":
        # two-word keys while they are plentiful (about 10 tokens a line), else three-word keys
        space = len(KEY_ADJECTIVES) * len(KEY_NOUNS)
        words = 2 if target / 8 < 0.3 * space else 3
        new_key = lambda: _word_key(rng, words)  # noqa: E731
    elif key_style == "uuid":
        new_key = lambda: _uuid_key(rng)  # noqa: E731
    else:
        raise ValueError(f"key_style must be 'words' or 'uuid', not {key_style!r}")
    key = new_key()
    used = {key}

    def filler() -> Iterator[str]:
        while True:
            k = new_key()
            if k in used:
                continue
            used.add(k)
            yield f"{k}: {_digits(rng, value_digits)}"

    answer = _digits(rng, value_digits)
    text, ids, n, depths, span = _assemble(
        enc, filler(), [_Needle(f"{key}: {answer}", depth)], target, rng, lambda r: "\n"
    )
    return dict(context=text, context_ids=ids, context_tokens=n, needle_depths=depths, needle_span=span, answer=answer,
                question=QUESTIONS["kv_lookup"].format(key=key), key=key)


_MAKERS = {"passkey": _make_passkey, "multikey_needle": _make_multikey, "kv_lookup": _make_kv}


# ---------------------------------------------------------------------------------------------
# Public generators
# ---------------------------------------------------------------------------------------------


def make_example(task: str, context_tokens: int, depth: float | None = None, seed: int | str = 0,
                 tokenizer=None, **task_kwargs) -> SyntheticExample:
    """One example, fully determined by (task, context_tokens, depth, seed, task_kwargs).

    ``tokenizer``: a ``tokenizers.Tokenizer`` (or a :class:`PieceEncoder`) that measures length;
    None estimates length and leaves ``context_ids`` empty. ``depth`` None draws one in [0, 1].
    Task options: passkey ``passkey_digits`` (5); multikey_needle ``num_needles`` (4),
    ``num_distractors`` (2), ``value_digits`` (7); kv_lookup ``key_style`` ("words" | "uuid"),
    ``value_digits`` (6); prose tasks ``pool_seed`` (0).
    """
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    rng = random.Random(f"{task}:{seed}")
    if depth is None:
        depth = rng.random()
    enc = piece_encoder(tokenizer) if tokenizer is not None else PieceEncoder(None)
    fields = _MAKERS[task](rng, enc, int(context_tokens), float(depth), **task_kwargs)
    return SyntheticExample(task=task, target_tokens=int(context_tokens), depth=float(depth),
                              seed=f"{task}:{seed}", **fields)


def make_examples(task: str, n: int, context_tokens: int, depth: float | None = None, seed: int = 0,
                  tokenizer=None, **task_kwargs) -> list[SyntheticExample]:
    """``n`` examples; the i-th is ``make_example(..., seed=f"{seed}.{i}")``, so any one can be
    regenerated alone and sets with different seeds do not overlap."""
    return [make_example(task, context_tokens, depth, f"{seed}.{i}", tokenizer, **task_kwargs) for i in range(n)]


def make_grid(task: str, lengths: Sequence[int], depths: Sequence[float], n_per_cell: int = 1, seed: int = 0,
              tokenizer=None, **task_kwargs) -> dict[tuple[int, float], list[SyntheticExample]]:
    """Examples on a (length x depth) grid: ``{(length, depth): [examples]}``, each cell with its
    own seeds (so cells are independent, and rerunning one cell reproduces it)."""
    return {
        (L, d): [make_example(task, L, d, f"{seed}.grid.{L}.{d}.{i}", tokenizer, **task_kwargs)
                 for i in range(n_per_cell)]
        for L in lengths for d in depths
    }


# ---------------------------------------------------------------------------------------------
# Pretraining-like text: documents packed into one sequence, each led by BOS
# ---------------------------------------------------------------------------------------------

DOCUMENT_KINDS = ("prose", "list", "record")


def document_ids(kind: str, tokens: int, rng: random.Random, tokenizer) -> list[int]:
    """One document of about ``tokens`` tokens (ids, no BOS), of one of DOCUMENT_KINDS:

    * ``prose``: haystack paragraphs;
    * ``list``: lines "<key>: <value>" or "- <a thing>", as in inventories and tables;
    * ``record``: one example of the retrieval tasks written out as text, its question and answer
      after it ("Question: ...\nAnswer: 48213"), as QA pairs sit in a web corpus.
    """
    enc = piece_encoder(tokenizer)
    if kind == "record":
        task = TASKS[rng.randrange(len(TASKS))]
        ex = make_example(task, max(16, tokens - 24), None, rng.getrandbits(48), enc)
        return list(ex.context_ids) + enc.encode(f"\nQuestion: {ex.question}\nAnswer: {ex.answer}")
    if kind == "prose":
        pool = haystack_pool()
        piece, sep = lambda: pool[rng.randrange(len(pool))], _prose_sep
    elif kind == "list":
        if rng.random() < 0.5:
            piece = lambda: f"{_word_key(rng)}: {_digits(rng, rng.choice((3, 4, 5, 6)))}"  # noqa: E731
        else:
            piece = lambda: f"- {_a(rng, _ADJECTIVES)} {_a(rng, _THINGS)}"  # noqa: E731
        sep = lambda r: "\n"  # noqa: E731
    else:
        raise ValueError(f"unknown document kind {kind!r}; choose from {DOCUMENT_KINDS}")
    ids: list[int] = []
    while len(ids) < tokens:
        ids += enc.encode((sep(rng) if ids else "") + piece())
    return ids


def packed_sequence(length: int, rng: random.Random, tokenizer, bos_id: int, min_doc: int = 32,
                    max_doc: int = 512) -> list[int]:
    """Exactly ``length`` ids: documents of random kind and length (``min_doc``..``max_doc``
    tokens), each led by ``bos_id``, packed one after another; the last one is cut where the
    sequence ends. This is how pretraining corpora are fed to LLaDA-style models, and why a BOS
    in the middle of a sequence is something such a model has seen."""
    out: list[int] = []
    while len(out) < length:
        n = rng.randint(min_doc, max(min_doc, max_doc))
        out += [bos_id] + document_ids(DOCUMENT_KINDS[rng.randrange(len(DOCUMENT_KINDS))], n, rng, tokenizer)
    return out[:length]


def split_passages(ids: Sequence[int], rng: random.Random, bos_id: int, min_len: int = 32,
                   max_len: int = 256) -> list[int]:
    """A context cut into passages of random length (``min_len``..``max_len`` tokens, cut at any
    token), each led by ``bos_id``: a retrieval-augmented prompt, where a document reaches the
    model as fixed-size passages with a separator each. A needle may be cut in two."""
    out: list[int] = []
    i = 0
    while i < len(ids):
        n = rng.randint(min_len, max_len)
        out += [bos_id] + list(ids[i : i + n])
        i += n
    return out


def corpus(seed: int = 0, n_sentences: int = 6000) -> Iterator[str]:
    """Text for training a tokenizer: haystack prose, all three needle kinds, questions.

    Needs no tokenizer (lengths are estimated), so it can build the tokenizer that later
    measures the real examples.
    """
    rng = random.Random(f"corpus:{seed}")
    for _ in range(n_sentences):
        yield haystack_sentence(rng)
    for i in range(40):
        for task in TASKS:
            ex = make_example(task, 160, None, f"corpus.{seed}.{i}", None,
                              **({"key_style": "uuid" if i % 2 else "words"} if task == "kv_lookup" else {}))
            yield ex.context
            yield f"Question: {ex.question}\nAnswer: {ex.answer}"
    for _ in range(300):
        yield magic_needle(_word_key(rng), _digits(rng, 7))
        yield "Question: " + QUESTIONS["multikey_needle"].format(key=_word_key(rng))
        yield "Question: " + QUESTIONS["kv_lookup"].format(key=_word_key(rng))
    # words of prompts and chat turns (the template itself lives in pdllm.tokenizer)
    for _ in range(20):
        yield ("system\n\nuser\n\nassistant\n\nYou are a helpful assistant. Answer the question based on the "
               "context below.\n\nContext:\nRead the context and answer the question with the number only.")


__all__ = [
    "TASKS", "QUESTIONS", "SyntheticExample", "PieceEncoder", "piece_encoder", "haystack_pool",
    "haystack_sentence", "make_example", "make_examples", "make_grid", "corpus", "passkey_needle",
    "magic_needle", "KEY_ADJECTIVES", "KEY_NOUNS", "DOCUMENT_KINDS", "document_ids", "packed_sequence",
    "split_passages",
]
