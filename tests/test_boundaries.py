"""boundaries.py: break strengths (from offsets and from the vocabulary) and chunk cuts snapped to them.

The tokenizers are byte-level BPEs built like the real ones (no download here): Dream's (Qwen2's split
regex, NFC, ByteLevel without its own regex) and LLaDA's (the Llama-3 split regex), trained on a small
mixed corpus, plus the toy model's, the embedded model's and the test fixture's (tests/conftest.py).
"""

import json
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pdllm.boundaries import (CLAUSE, LINE, NONE, PARAGRAPH, SENTENCE, WORD, _byte_level_chars, char_breaks,
                              snapped_spans, text_breaks, token_breaks, token_bytes)

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

PROSE = ("The farmer carried a basket to the market. It was heavy, and the road was long; nobody helped him.\n\n"
         "\"Where is my lantern?\" asked the old sailor. Nobody knew! Was it lost? Perhaps.\n")
CHINESE = "我是一个学生。他是老师，我们在学校里学习。今天天气很好！你去哪里？「好。」他说：明天见。\n\n第二段落。"
JAPANESE = "私は学生です。東京に住んでいます、毎日電車で学校へ行きます！カタカナとひらがな。"
CODE = "def f(x, y):\n    if x > y:\n        return x  # larger\n    return y\n\n\nclass A:\n    pass\n"
NO_PUNCTUATION = " ".join(["lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"] * 6)
HUGE_LINE = ("token" * 40 + " " + "x=1;" * 20) * 20  # one line, minified-code style, long words
CORPUS = [PROSE, CHINESE, JAPANESE, CODE, NO_PUNCTUATION, HUGE_LINE] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|startoftext|>", "<|eot_id|>", "<|mdm_mask|>"]


def byte_level_bpe(split: str, nfc: bool, vocab_size: int = 700):
    """A byte-level BPE built like Qwen2's / Llama-3's tokenizer.json (a Split, then ByteLevel without its regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    if nfc:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    return tk


@pytest.fixture(scope="module")
def byte_level_tokenizers(llada_dir):
    from tokenizers import Tokenizer

    from pdllm.data.toy_tokenizer import build_toy_tokenizer
    from pdllm.loading import EMBEDDED_MODEL

    class Named(dict):  # Hypothesis prints its arguments: names, not whole vocabularies
        def __repr__(self):
            return f"<tokenizers {', '.join(self)}>"

    return Named({
        "dream-like": byte_level_bpe(QWEN2_SPLIT, nfc=True),
        "llada-like": byte_level_bpe(LLAMA3_SPLIT, nfc=False),
        "toy": build_toy_tokenizer(),
        "embedded": Tokenizer.from_file(str(EMBEDDED_MODEL / "tokenizer.json")),
        "fixture": Tokenizer.from_file(str(llada_dir / "tokenizer.json")),  # no CJK merges: '。' is 3 byte tokens
    })


# ---------------------------------------------------------------------------------------------
# Break strengths of text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, before, strength", [
    ("end. Next", "end.", SENTENCE),
    ("end. Next", "end", NONE),
    ("end.  Next", "end. ", SENTENCE),  # anywhere in the spaces after the full stop
    ("end.\nNext", "end.\n", LINE),
    ("end.\n\nNext", "end.\n", LINE),  # between the two newlines: a line ends, the paragraph does not
    ("end.\n\nNext", "end.\n\n", PARAGRAPH),
    ("end.\r\n\r\nNext", "end.\r\n\r\n", PARAGRAPH),
    ("a\r\nb", "a\r", WORD),  # "\r\n" is one line end, at the "\n"
    ("a\r\nb", "a\r\n", LINE),
    ("def f():\n    return 1", "def f():\n", LINE),
    ("def f():\n    return 1", "def f():\n  ", LINE),  # indentation goes with the next line
    ("pi is 3.14 here", "pi is 3.", NONE),
    ("open file.py now", "open file.", NONE),
    ('He said "stop." Then', 'He said "stop."', SENTENCE),
    ('He said "stop." Then', 'He said "stop.', NONE),
    ("(see above) then", "(see above)", WORD),
    ("Wait?! No", "Wait?", NONE),
    ("Wait?! No", "Wait?!", SENTENCE),
    ("red, green; blue: yes", "red,", CLAUSE),
    ("red, green; blue: yes", "red, green;", CLAUSE),
    ("wordword", "word", NONE),
    ("我是学生。他", "我是学生。", SENTENCE),
    ("我是学生。他", "我是学生", SENTENCE),  # before the mark too: Qwen2's split glues "。他" together
    ("我是学生。他", "我是", WORD),  # no spaces in CJK: between two ideographs is a word gap
    ("「好。」你", "「好。」", SENTENCE),
    ("「好。」你", "「好。", NONE),
    ("「好。」你", "「好", SENTENCE),
    ("「好。」你", "「", NONE),
    ("甲，乙、丙", "甲，", CLAUSE),
    ("甲，乙、丙", "甲", CLAUSE),
    ("！？你", "！", NONE),
    ("甲，乙、丙", "甲，乙、", CLAUSE),
    ("です！カタ", "です！", SENTENCE),
    ("한국어 문장", "한국", NONE),  # Korean puts spaces between words
])
def test_char_breaks_rate_each_kind_of_break(text, before, strength):
    rated = char_breaks(text)
    assert len(rated) == len(text) + 1 and rated[len(text)] == PARAGRAPH and rated[0] == NONE
    assert text.startswith(before)
    assert rated[len(before)] == strength


# ---------------------------------------------------------------------------------------------
# Offsets (path a) and vocabulary (path b) on byte-level tokenizers
# ---------------------------------------------------------------------------------------------

FRAGMENTS = ["The", " farmer", " carried", " a", " basket", ".", ",", ";", ":", "!", "?", '"', "'", ")", "(", " ",
             "  ", "\n", "\n\n", "\r\n", "\t", "3", ".14", "file.py", "我", "是", "学生", "。", "，", "、", "「", "」",
             "！", "？", "です", "カタカナ", "😀", "é", "ß", "\u3000", "    ", "return", "x=1;", "token" * 12]
texts = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=60).map("".join)


@given(text=texts)
def test_offsets_and_vocabulary_agree_on_byte_level_tokenizers(byte_level_tokenizers, text):
    for name, tk in byte_level_tokenizers.items():
        enc = tk.encode(text, add_special_tokens=False)
        by_offsets, by_vocab = text_breaks(text, enc.offsets), token_breaks(enc.ids, tk)
        assert by_offsets.tolist() == by_vocab.tolist(), name
        assert by_offsets[-1] == PARAGRAPH
        table, _ = token_bytes(tk)
        assert b"".join(table[i] for i in enc.ids).decode("utf-8") == text, name  # the table spells the text


def test_the_byte_level_table_matches_the_pre_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel

    chars = _byte_level_chars()
    assert sorted(chars.values()) == list(range(256))
    pre = ByteLevel(add_prefix_space=False, use_regex=False)
    # every byte that valid UTF-8 can hold (all but C0, C1, F5..FF), through the library's own mapping
    for ch in ["".join(map(chr, range(1, 128))), "é߿", "\u0800\uffff", "\U00010000\U0010ffff", "\x80\u07c0"]:
        ((mapped, _),) = pre.pre_tokenize_str(ch)
        assert bytes(chars[c] for c in mapped) == ch.encode("utf-8")


def test_a_cjk_full_stop_is_found_both_ways(byte_level_tokenizers):
    """Whether '。' is its own token, three byte tokens (the fixture: no CJK merges) or glued to the next
    word (Qwen2's and Llama-3's split regex), a sentence-end cut lies right before or right after it."""
    text = "我是学生。他是老师。"
    stop = text.index("。")
    for name, tk in byte_level_tokenizers.items():
        enc = tk.encode(text, add_special_tokens=False)
        by_offsets, by_vocab = text_breaks(text, enc.offsets), token_breaks(enc.ids, tk)
        assert by_offsets.tolist() == by_vocab.tolist(), name
        ends = [enc.offsets[t][1] for t, s in enumerate(by_vocab.tolist()) if s >= SENTENCE]
        assert ends and ends[0] in (stop, stop + 1) and ends[-1] == len(text), name
        inside = [t for t, (b, e) in enumerate(enc.offsets) if (b, e) == (stop, stop + 1)][:-1]
        assert all(by_vocab[t] == NONE for t in inside), name  # never between the bytes of one character
    assert [o for o in byte_level_tokenizers["fixture"].encode(text).offsets].count((stop, stop + 1)) == 3
    glued = byte_level_tokenizers["dream-like"].encode(text, add_special_tokens=False).offsets
    assert not any(e == stop + 1 for _, e in glued)  # no cut after the mark: only the one before it


def test_token_breaks_read_a_context_that_starts_or_ends_inside_a_character(byte_level_tokenizers):
    tk = byte_level_tokenizers["fixture"]
    ids = tk.encode("。end. 我", add_special_tokens=False).ids
    assert len(ids) == 11  # 。 e n d . " " 我, each character a token per byte
    rated = token_breaks(ids[1:-1], tk).tolist()  # the first and last character lose some of their bytes
    assert rated == [NONE, NONE, NONE, NONE, NONE, SENTENCE, SENTENCE, NONE, PARAGRAPH]


def test_where_the_paths_cannot_agree_a_normalizer_changes_a_break_character(byte_level_tokenizers):
    tk = byte_level_tokenizers["dream-like"]  # NFC, as Qwen2's: U+037E GREEK QUESTION MARK becomes ";"
    text = "a\u037e b"
    enc = tk.encode(text, add_special_tokens=False)
    after_mark = next(t for t, (b, e) in enumerate(enc.offsets) if e == 2)
    assert text_breaks(text, enc.offsets)[after_mark] == WORD  # the text has no clause mark
    assert token_breaks(enc.ids, tk)[after_mark] == CLAUSE  # the tokens have a semicolon


def test_vocabulary_path_on_a_sentencepiece_style_tokenizer():
    """No ByteLevel decoder: each id's text is decoded after an ordinary token, so "▁" keeps its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator([PROSE, NO_PUNCTUATION] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    text = "The farmer carried a basket. It was heavy, and the road was long; nobody helped him."
    enc = tk.encode(text)
    assert token_breaks(enc.ids, tk).tolist() == text_breaks(text, enc.offsets).tolist()


@pytest.mark.parametrize("text", [PROSE, CHINESE + JAPANESE, CODE, NO_PUNCTUATION, HUGE_LINE])
def test_long_context_prompt_breaks_are_the_context_offsets(llada_dir, text):
    from tokenizers import Tokenizer as HFTokenizer

    from pdllm.tokenizer import Tokenizer

    tk = HFTokenizer.from_file(str(llada_dir / "tokenizer.json"))
    tk.add_tokens(["<|reserved_7|>"])  # a plain added token: encode falls back to its special path
    tok = Tokenizer(tk, "llada")
    for context in (text, "a <|reserved_7|> b. " + text + " <|eot_id|><|reserved_7|>\n\n"):
        prompt = tok.long_context_prompt(context, "What is it?")
        assert prompt.context == tok.encode(context) and len(prompt.breaks) == len(prompt.context)
        assert prompt.breaks == token_breaks(prompt.context, tk).tolist()  # the offsets are those of these ids


# ---------------------------------------------------------------------------------------------
# Snapped spans
# ---------------------------------------------------------------------------------------------


def fixed(n, chunk):
    return [(b, min(b + chunk, n)) for b in range(0, n, chunk)]


def reference_cuts(n, chunk, strengths, window, max_len):
    """The rule, written out one cut at a time (the module computes it vectorised)."""
    cuts, prev = [], 0
    for k in range(1, math.ceil(n / chunk)):
        target = k * chunk
        allowed = [c for c in range(target - window, target + window + 1)
                   if 1 <= c <= n - 1 and c - prev <= max_len and strengths[c - 1] >= WORD]
        c = max(allowed, key=lambda c: (strengths[c - 1], -abs(c - target), -c), default=target)
        cuts.append(c)
        prev = c
    return cuts


@st.composite
def layouts(draw):
    chunk = draw(st.integers(1, 40))
    window = draw(st.integers(0, (chunk - 1) // 2))
    n = draw(st.integers(0, 8 * chunk + 3))
    strengths = draw(st.lists(st.sampled_from([NONE, NONE, NONE, WORD, WORD, CLAUSE, SENTENCE, LINE, PARAGRAPH]),
                              min_size=n, max_size=n))
    return n, chunk, window, strengths


@given(layout=layouts(), loose=st.booleans())
def test_snapped_spans_keep_their_guarantees(layout, loose):
    n, chunk, window, strengths = layout
    max_len = chunk + 2 * window if loose else chunk + window
    spans = snapped_spans(n, chunk, strengths, window, max_len=max_len if loose else None)
    assert len(spans) == math.ceil(n / chunk)
    bounds = [0] + [e for _, e in spans]
    assert [b for b, _ in spans] == bounds[:-1] and bounds[-1] == n
    assert all(1 <= e - b <= max_len for b, e in spans)
    cuts = [e for _, e in spans[:-1]]
    assert all(abs(c - k * chunk) <= window for k, c in enumerate(cuts, 1))
    assert cuts == reference_cuts(n, chunk, strengths, window, max_len)
    assert snapped_spans(n, chunk, strengths, 0) == fixed(n, chunk)


@given(layout=layouts())
def test_without_the_length_cap_each_cut_is_the_strongest_break_in_its_window(layout):
    n, chunk, window, strengths = layout
    spans = snapped_spans(n, chunk, strengths, window, max_len=chunk + 2 * window)
    for k, (_, c) in enumerate(spans[:-1], 1):
        window_best = max(strengths[t - 1] for t in range(k * chunk - window, min(k * chunk + window, n - 1) + 1))
        assert strengths[c - 1] == window_best or (window_best < WORD and c == k * chunk)


def test_no_break_at_all_leaves_the_fixed_chunks():
    for n in (1, 127, 128, 129, 1000):
        assert snapped_spans(n, 128, [NONE] * n, 16) == fixed(n, 128)
    # breaks only far from the targets: the cuts stay put, and the spans stay within the cap
    strengths = [PARAGRAPH if t % 128 == 64 else NONE for t in range(1000)]
    assert snapped_spans(1000, 128, strengths, 16) == fixed(1000, 128)


def test_the_length_cap_holds_a_cut_back():
    strengths = [NONE] * 400
    strengths[100 - 1] = PARAGRAPH  # the first cut moves 28 tokens early, to 100
    strengths[270 - 1] = PARAGRAPH  # in the second window (256 +- 30), but 170 after 100: over 128 + 30
    strengths[240 - 1] = SENTENCE
    assert snapped_spans(400, 128, strengths, 30)[:2] == [(0, 100), (100, 240)]
    assert snapped_spans(400, 128, strengths, 30, max_len=128 + 60)[:2] == [(0, 100), (100, 270)]
    strengths[240 - 1] = NONE  # nothing else in reach: the target
    assert snapped_spans(400, 128, strengths, 30)[:2] == [(0, 100), (100, 256)]


@pytest.mark.parametrize("args, message", [
    ((10, 8, [0] * 10, 4), "window < chunk_size / 2"),
    ((10, 0, [0] * 10, 0), "chunk_size >= 1"),
    ((10, 8, [0] * 9, 1), "strengths has 9 entries"),
    ((10, 8.0, [0] * 10, 1), "chunk_size=8.0 must be an int"),
    ((-1, 8, [], 1), "n_tokens >= 0"),
])
def test_snapped_spans_reject_bad_arguments(args, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        snapped_spans(*args)


def test_max_len_below_chunk_size_plus_window_is_rejected():
    with pytest.raises(ValueError, match=r"max_len >= chunk_size \+ window"):
        snapped_spans(100, 16, [0] * 100, 4, max_len=19)


@pytest.mark.parametrize("text", [CODE * 30, NO_PUNCTUATION * 5, HUGE_LINE * 3, (CHINESE + JAPANESE) * 10, PROSE * 20])
def test_spans_on_real_text_keep_their_guarantees(byte_level_tokenizers, text):
    for name, tk in byte_level_tokenizers.items():
        enc = tk.encode(text, add_special_tokens=False)
        n, rated = len(enc.ids), token_breaks(enc.ids, tk)
        for chunk, window in ((16, 7), (64, 16), (128, 32)):
            spans = snapped_spans(n, chunk, rated, window)
            assert len(spans) == math.ceil(n / chunk) and all(1 <= e - b <= chunk + window for b, e in spans), name
            assert [b for b, _ in spans[1:]] == [e for _, e in spans[:-1]] and spans[-1][1] == n


sentences = st.lists(st.sampled_from(["The old farmer carried a basket.", "Nobody knew!", "Was it lost?",
                                      "It was heavy, and the road was long.", "我是学生。", "Every morning the cat slept."]),
                     min_size=2, max_size=12).map(" ".join)


@given(before=sentences, after=sentences, name=st.sampled_from(["dream-like", "llada-like", "toy"]), data=st.data())
def test_a_needle_next_to_a_sentence_end_is_not_cut(byte_level_tokenizers, before, after, name, data):
    """A one-sentence needle across the first target cut stays whole when a sentence end lies in the window."""
    tk = byte_level_tokenizers[name]
    needle = "The pass key is 71432."
    text = f"{before} {needle} {after}"
    enc = tk.encode(text, add_special_tokens=False)
    start, end = len(before) + 1, len(before) + 1 + len(needle)
    a = next(t for t, (_, e) in enumerate(enc.offsets) if e > start)  # its first letter's token (" The" or "The")
    z = next(t for t, (_, e) in enumerate(enc.offsets) if e == end) + 1
    chunk = a + data.draw(st.integers(1, z - a - 1), label="target inside the needle")
    assume(chunk >= 3)
    window = data.draw(st.integers(1, (chunk - 1) // 2), label="window")
    assume(z < 2 * chunk - window)  # the second cut lies past the needle
    rated = token_breaks(enc.ids, tk)
    assert rated[a - 1] == rated[z - 1] == SENTENCE and max(rated[a:z - 1]) < SENTENCE
    spans = snapped_spans(len(enc.ids), chunk, rated, window)
    whole = any(b <= a and z <= e for b, e in spans)
    assert whole == (chunk - a <= window or z - chunk <= window)  # cut exactly when no sentence end is in reach
