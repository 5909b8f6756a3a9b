"""Synthetic long-context tasks and the toy tokenizer (CPU, a few seconds)."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer

from pdllm.data.synthetic import (
    KEY_ADJECTIVES,
    KEY_NOUNS,
    TASKS,
    PieceEncoder,
    make_example,
    make_examples,
    make_grid,
)
from pdllm.data.toy_tokenizer import VOCAB_SPECIALS, build_toy_tokenizer, save, special_ids


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_toy_tokenizer(seed=0)


def _answer_pattern(ex) -> str:
    if ex.task == "passkey":
        return r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\."
    if ex.task == "multikey_needle":
        return rf"One of the special magic numbers for {re.escape(ex.key)} is: (\d+)\."
    return rf"(?m)^{re.escape(ex.key)}: (\d+)$"


def _needle_span(ex) -> tuple[int, int]:
    return re.search(_answer_pattern(ex), ex.context).span()


# ------------------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_from_seed(task, tok):
    a = make_examples(task, 3, 300, None, seed=7, tokenizer=tok)
    b = make_examples(task, 3, 300, None, seed=7, tokenizer=tok)
    c = make_examples(task, 3, 300, None, seed=8, tokenizer=tok)
    assert a == b
    assert [e.context for e in a] != [e.context for e in c]
    assert len({e.context for e in a}) == 3  # examples within a set differ too
    # one example regenerates alone from its seed
    assert make_example(task, 300, None, "7.1", tok) == a[1]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("target", [256, 1024])
def test_length_ids_and_answer(task, target, tok):
    for ex in make_examples(task, 4, target, None, seed=1, tokenizer=tok):
        ids = tok.encode(ex.context).ids
        assert ex.context_ids == ids  # the piecewise encoder is exact
        assert ex.context_tokens == len(ids)
        assert abs(len(ids) - target) <= max(16, 0.03 * target), (len(ids), target)
        assert ex.answer.isdigit()
        # the answer is recoverable from the context
        m = re.findall(_answer_pattern(ex), ex.context)
        assert len(m) == 1, m
        groups = m[0] if isinstance(m[0], tuple) else (m[0],)
        assert all(g == ex.answer for g in groups)
        assert ex.context == ex.context.strip()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_at_requested_depth(task, depth, tok):
    target = 768
    ex = make_example(task, target, depth, seed=3, tokenizer=tok)
    measured = ex.needle_depths[0]
    # at most half a filler sentence (<= ~30 tokens) away from the request
    assert abs(measured - depth) <= 16 / target, (measured, depth)
    # and the needle really is there: count the tokens in front of it
    start, end = _needle_span(ex)
    prefix = ex.context[:start].rstrip()
    before = len(tok.encode(prefix).ids)
    needle_tokens = len(tok.encode(ex.context[len(prefix):end]).ids)  # with its separator
    denom = ex.context_tokens - needle_tokens
    assert abs(before / denom - measured) <= 2 / target, (before / denom, measured)
    if depth == 0.0:
        assert start == 0
    if depth == 1.0:
        assert end == len(ex.context)


@pytest.mark.parametrize("task", ["multikey_needle", "kv_lookup"])
def test_question_key_exists_once(task, tok):
    for ex in make_examples(task, 5, 1024, None, seed=2, tokenizer=tok):
        assert ex.key and ex.key in ex.question
        hits = re.findall(rf"(?<![\w-]){re.escape(ex.key)}(?![\w-])", ex.context)
        assert len(hits) == 1


def test_kv_keys_unique_and_uuid_style(tok):
    for style in ("words", "uuid"):
        ex = make_example("kv_lookup", 2048, 0.4, seed=5, tokenizer=tok, key_style=style)
        keys = [line.split(": ")[0] for line in ex.context.split("\n")]
        assert len(keys) == len(set(keys)) > 80
        assert all(re.fullmatch(r"[^:\s]+: \d+", line) for line in ex.context.split("\n"))
        if style == "uuid":
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}", ex.key)


def test_multikey_needles_and_distractors(tok):
    ex = make_example("multikey_needle", 1024, 0.5, seed=4, tokenizer=tok, num_needles=5, num_distractors=3)
    keys = re.findall(r"magic numbers for ([\w-]+) is", ex.context)
    values = re.findall(r"magic numbers for [\w-]+ is: (\d+)", ex.context)
    assert len(keys) == len(set(keys)) == 8 == len(ex.needle_depths)
    assert len(set(values)) == 8 and all(len(v) == 7 for v in values)
    adj, noun = ex.key.split("-")
    assert adj in KEY_ADJECTIVES and noun in KEY_NOUNS
    sharing = [k for k in keys if k != ex.key and (k.split("-")[0] == adj or k.split("-")[1] == noun)]
    assert len(sharing) == 3  # exactly the distractors share a word with the asked key


def test_depth_none_spreads_and_grid(tok):
    depths = [e.depth for e in make_examples("passkey", 20, 128, None, seed=0, tokenizer=tok)]
    assert min(depths) < 0.25 and max(depths) > 0.75
    grid = make_grid("passkey", [128, 256], [0.0, 0.5, 1.0], n_per_cell=2, seed=0, tokenizer=tok)
    assert sorted(grid) == [(L, d) for L in (128, 256) for d in (0.0, 0.5, 1.0)]
    for (L, d), cell in grid.items():
        assert len(cell) == 2 and cell[0].answer != cell[1].answer
        assert all(e.target_tokens == L and e.depth == d for e in cell)


def test_no_tokenizer_estimates_length():
    ex = make_example("passkey", 500, 0.5, seed=0)
    assert ex.context_ids is None
    assert abs(ex.context_tokens - 500) <= 20
    assert PieceEncoder(None).count("The pass key is 123.") == 8


def test_haystack_has_no_answer_material(tok):
    ex = make_example("passkey", 2048, 0.5, seed=9, tokenizer=tok)
    hay = ex.context.replace(f"The pass key is {ex.answer}. Remember it. {ex.answer} is the pass key.", "")
    assert not re.search(r"\d|pass key|magic|number", hay)


# -------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_and_size(tok):
    assert 1000 <= tok.get_vocab_size() <= 2000
    for i, s in enumerate(VOCAB_SPECIALS):
        assert tok.token_to_id(s) == i
        assert tok.encode(f"x{s}y").ids[1] == i  # matched inside text as one token
    ids = special_ids(tok)
    assert ids["pad"] == ids["eos"] == tok.token_to_id("<|endoftext|>")
    assert ids["mask"] == tok.token_to_id("<|mdm_mask|>")


def test_tokenizer_round_trip(tok):
    texts = [
        "Hello\n\nworld\n",
        "  leading and trailing spaces  \t\r\n",
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is the pass key?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|mdm_mask|><|mdm_mask|><|endoftext|>",
        "ünïcödé, emoji 😀, CJK 長い文脈, tabs\tand symbols {}[]#@~",
        "The pass key is 48213. Remember it. 48213 is the pass key.",
    ]
    for t in texts:
        assert tok.decode(tok.encode(t).ids, skip_special_tokens=False) == t


def test_digits_are_single_tokens(tok):
    for d in "0123456789":
        assert len(tok.encode(d).ids) == 1
    ids = tok.encode("1234567890").ids
    assert len(ids) == 10
    assert tok.encode("is: 4821309.").tokens[-8:-1] == list("4821309")


def test_tokenizer_deterministic_and_saved(tok, tmp_path):
    assert build_toy_tokenizer(seed=0).to_str() == tok.to_str()
    path = save(tmp_path, tok)
    assert path.name == "tokenizer.json" and (tmp_path / "tokenizer_config.json").exists()
    loaded = Tokenizer.from_file(str(path))
    s = "One of the special magic numbers for calm-otter is: 1234567.\n<|mdm_mask|>"
    assert loaded.encode(s).ids == tok.encode(s).ids
