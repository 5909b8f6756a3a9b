"""The scoring functions of LongBench and InfiniteBench, written anew without their dependencies.

Where each definition comes from (read for the semantics; no code copied):

* LongBench v1: THUDM/LongBench, ``LongBench/metrics.py`` (the metric functions) and ``LongBench/eval.py``
  (``dataset2metric``; the score of one prediction is the max over its reference answers).
* InfiniteBench: OpenBMB/InfiniteBench (formerly xinrongzhang2022/InfiniteBench), ``src/compute_scores.py``
  (``get_score_one_*``).

Upstream imports jieba, fuzzywuzzy, ``rouge`` (pltrdy) and HF ``evaluate``; we import none of them:

* Chinese text is tokenised per character. InfiniteBench's Chinese F1 does exactly this; LongBench segments words
  with jieba, so ``qa_f1_zh_score`` and ``rouge_zh_score`` differ slightly from LongBench's numbers.
* fuzzywuzzy's ``fuzz.ratio`` is ``round(100 * difflib.SequenceMatcher(None, a, b).ratio())`` when
  python-Levenshtein is absent, as it is with LongBench's requirements; ``code_sim_score`` computes that.
* ROUGE-L comes in the flavours the benchmarks actually run: ``rouge_score`` reproduces pltrdy's ``rouge``
  (LongBench), ``rouge_lsum`` reproduces Google's ``rouge_score`` ``rougeLsum`` (InfiniteBench, through
  ``evaluate``), and ``rouge_l`` is plain sentence-level ROUGE-L (Google's ``rougeL``).

Upstream quirks that change numbers are kept on purpose, so that scores compare with published ones; each is
named where it happens.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from functools import partial
from typing import Callable, Sequence

# ---------------------------------------------------------------------------------------------------------------
# Normalisation and token F1 (LongBench metrics.py; the same code is in InfiniteBench compute_scores.py)

# LongBench's list of Chinese punctuation, character for character (it has "》" but not "《").
_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_EN_PUNCTUATION = set(string.punctuation)
_ALL_PUNCTUATION = set(string.punctuation + _ZH_PUNCTUATION)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD style)."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, drop all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION and not ch.isspace())


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    overlap = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 after ``normalize_answer``, tokens split on whitespace."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str) -> float:
    """Character F1 after ``normalize_zh_answer`` (InfiniteBench's definition; LongBench uses jieba words)."""
    return token_f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(ground_truth)))


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the two strings are equal after ``normalize_answer``."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


# ---------------------------------------------------------------------------------------------------------------
# LongBench's counting, retrieval, classification and code metrics (LongBench metrics.py)


def _share_of_numbers_equal(prediction: str, target: str) -> float:
    """The fraction of the numbers written in ``prediction`` that equal ``target`` (0 when it has none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str) -> float:
    """passage_count: the share of numbers in the prediction that are the right count."""
    return _share_of_numbers_equal(prediction, str(ground_truth))


def _paragraph_number(ground_truth: str, pattern: str) -> str:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"reference answer {ground_truth!r} does not name a paragraph (expected {pattern!r})")
    return found[0]


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """passage_retrieval_en: the share of numbers in the prediction equal to N of the reference 'Paragraph N'."""
    return _share_of_numbers_equal(prediction, _paragraph_number(ground_truth, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, ground_truth: str) -> float:
    """passage_retrieval_zh: as ``retrieval_score`` with the reference written '段落N'."""
    return _share_of_numbers_equal(prediction, _paragraph_number(ground_truth, r"段落(\d+)"))


def _drop_partial_matches(matched: list[str], ground_truth: str) -> list[str]:
    """Drop matched class names that are strict substrings of the ground truth, as LongBench does it.

    Upstream removes items from the list it is iterating over, so the item right after a removed one is never
    examined and always stays; we reproduce that to keep the scores identical.
    """
    kept, skip_next = [], False
    for name in matched:
        if not skip_next and name in ground_truth and name != ground_truth:
            skip_next = True
            continue
        kept.append(name)
        skip_next = False
    return kept


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
    """trec, lsht: 1/k when the ground truth is among the k class names found in the prediction, else 0."""
    matched = _drop_partial_matches([name for name in all_classes if name in prediction], ground_truth)
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def _first_code_line(prediction: str) -> str:
    """The first line of the prediction that holds no backtick, '#' or '//' ('' when there is none)."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """lcc, repobench-p: fuzzywuzzy's ``fuzz.ratio`` / 100 between the first code line and the reference.

    fuzzywuzzy without python-Levenshtein (LongBench's set-up) computes
    ``round(100 * difflib.SequenceMatcher(None, a, b).ratio())``, returning 100 for equal strings and 0 when one
    of them is empty; this is that computation.
    """
    line = _first_code_line(prediction)
    if line == ground_truth:
        return 1.0
    if not line or not ground_truth:
        return 0.0
    return round(100 * difflib.SequenceMatcher(None, line, ground_truth).ratio()) / 100


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L


def _lcs_table(a: Sequence[str], b: Sequence[str]) -> list[list[int]]:
    """table[i][j] = length of the longest common subsequence of a[:i] and b[:j]."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        above, row = table[i - 1], table[i]
        for j, y in enumerate(b, 1):
            row[j] = above[j - 1] + 1 if x == y else max(above[j], row[j - 1])
    return table


def _lcs_positions(a: Sequence[str], b: Sequence[str], *, on_tie_step_a: bool) -> list[int]:
    """Positions in ``a`` of one longest common subsequence, read back from the ends of both sequences.

    Which of several equally long subsequences comes out depends on the step taken when both are possible:
    pltrdy's ``rouge`` steps back in ``b``, Google's ``rouge_score`` in ``a``.
    """
    table = _lcs_table(a, b)
    i, j, positions = len(a), len(b), []
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            positions.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1] or (on_tie_step_a and table[i - 1][j] == table[i][j - 1]):
            i -= 1
        else:
            j -= 1
    return positions[::-1]


def _f_measure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _rouge_tokens(text: str) -> list[str]:
    """Google ``rouge_score`` default tokenizer without stemming: lowercase runs of [a-z0-9]."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """Sentence-level ROUGE-L F-measure: the LCS of the whole token sequences.

    Tokens as Google's ``rouge_score`` makes them (lowercase runs of [a-z0-9]), so this equals its ``rougeL``
    without stemming.
    """
    predicted, expected = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not predicted or not expected:
        return 0.0
    lcs = _lcs_table(expected, predicted)[-1][-1]
    return _f_measure(lcs / len(predicted), lcs / len(expected))


def _pltrdy_sentences(text: str) -> list[str]:
    """pltrdy ``Rouge.get_scores``: split at '.', keep non-empty pieces, collapse their whitespace."""
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def rouge_score(prediction: str, ground_truth: str) -> float:
    """LongBench's ROUGE-L: pltrdy ``rouge`` 1.0.1, ``Rouge().get_scores(...)['rouge-l']['f']``.

    That is summary-level ROUGE-L over *distinct* words (its default ``exclusive=True``): sentences are split at
    '.', words at single spaces, case is kept; the hits are the distinct words that lie on a longest common
    subsequence of some reference sentence and some predicted sentence; precision and recall divide by the
    number of distinct words of the prediction and of the reference. Upstream returns 0.0 on any exception,
    e.g. for an empty prediction; it also does so when its recursive LCS read-out overflows Python's stack on a
    sentence pair of roughly a thousand words, where we still compute the score.
    """
    predicted, expected = _pltrdy_sentences(prediction), _pltrdy_sentences(ground_truth)
    if not predicted or not expected:
        return 0.0
    predicted_words = {word for sentence in predicted for word in sentence.split(" ")}
    expected_words = {word for sentence in expected for word in sentence.split(" ")}
    hits: set[str] = set()
    for reference_sentence in expected:
        reference_tokens = reference_sentence.split(" ")
        for sentence in predicted:
            positions = _lcs_positions(reference_tokens, sentence.split(" "), on_tie_step_a=False)
            hits.update(reference_tokens[i] for i in positions)
    precision, recall = len(hits) / len(predicted_words), len(hits) / len(expected_words)
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_zh_score(prediction: str, ground_truth: str) -> float:
    """``rouge_score`` over space-separated characters (LongBench separates jieba words instead)."""
    return rouge_score(" ".join(prediction), " ".join(ground_truth))


def rouge_lsum(prediction: str, ground_truth: str) -> float:
    """InfiniteBench's En.Sum metric: ``evaluate.load('rouge')`` ``rougeLsum`` F-measure, no stemmer.

    Google ``rouge_score`` summary-level LCS: sentences are the non-empty lines; for each reference sentence the
    union of its LCS positions with every predicted sentence counts as hits, each token at most as often as it
    occurs in both texts.
    """
    expected = [_rouge_tokens(line) for line in ground_truth.split("\n") if line]
    predicted = [_rouge_tokens(line) for line in prediction.split("\n") if line]
    expected_total, predicted_total = sum(map(len, expected)), sum(map(len, predicted))
    if not expected_total or not predicted_total:
        return 0.0
    expected_left = Counter(token for sentence in expected for token in sentence)
    predicted_left = Counter(token for sentence in predicted for token in sentence)
    hits = 0
    for reference_sentence in expected:
        union = set().union(*(_lcs_positions(reference_sentence, s, on_tie_step_a=True) for s in predicted))
        for token in (reference_sentence[i] for i in sorted(union)):
            if expected_left[token] > 0 and predicted_left[token] > 0:
                hits += 1
                expected_left[token] -= 1
                predicted_left[token] -= 1
    return _f_measure(hits / predicted_total, hits / expected_total)


# ---------------------------------------------------------------------------------------------------------------
# InfiniteBench's task scorers (InfiniteBench src/compute_scores.py, get_score_one_<task>)


def _blank_out(text: str, pieces: Sequence[str]) -> str:
    """Replace every occurrence of each of ``pieces`` with a space."""
    for piece in pieces:
        text = text.replace(piece, " ")
    return text


def _collapse_spaces(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def _text_after_cue(text: str, cues: Sequence[str]) -> str | None:
    """What follows the first of ``cues`` (tried in order) found in ``text``, less one separating character."""
    for cue in cues:
        at = text.find(cue)
        if at != -1:
            return text[at + len(cue) + 1 :]
    return None


_RETRIEVAL_SEPARATORS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")


def first_int_match(prediction: str, ground_truth: str) -> float:
    """passkey, number_string: the first run of ASCII digits in the prediction equals the answer."""
    found = re.search(r"[0-9]+", prediction)
    return float((found.group() if found else "") == ground_truth)


def kv_retrieval_match(prediction: str, ground_truth: str) -> float:
    """kv_retrieval: the answer is one of the prediction's words, split at whitespace and :"'.,?!{}."""
    return float(ground_truth in _blank_out(prediction, _RETRIEVAL_SEPARATORS).split())


def code_run_match(prediction: str, ground_truth: str) -> float:
    """code_run: the last word of the prediction (split also at . ` ' " :) is the integer answer."""
    words = _blank_out(prediction.strip(), ("\n", ".", "`", "'", '"', ":")).split()
    try:
        return float(bool(words) and int(words[-1]) == int(ground_truth))
    except ValueError:
        return 0.0


def math_find_match(prediction: str, ground_truth: str) -> float:
    """math_find: the first number in the prediction equals the answer.

    Upstream parses that number as an int for integer answers and crashes on a decimal one; comparing as floats
    agrees with it everywhere else.
    """
    found = re.search(r"\d+\.\d+|\d+", prediction)
    return float(found is not None and float(found.group()) == float(ground_truth))


def math_calc_score(prediction: str, answers: Sequence[str]) -> float:
    """math_calc: the share of the expected values that the prediction reproduces in order, up to the first miss.

    ``answers`` is here the expected sequence of values, not alternatives. As upstream, numbers are runs of
    digits, so minus signs are ignored.
    """
    expected = [int(value) for value in answers]
    predicted = [int(number) for number in re.findall(r"[0-9]+", prediction)]
    correct = 0
    for want, got in zip(expected, predicted):
        if want != got:
            break
        correct += 1
    return correct / len(expected)


def dialogue_name_match(prediction: str, answers: Sequence[str]) -> float:
    """longdialogue_qa_eng: the *first* answer is one of the prediction's words, upper-cased."""
    words = _blank_out(prediction.strip(), _RETRIEVAL_SEPARATORS).split()
    return float(answers[0] in [word.upper() for word in words])


def choice_match(prediction: str, label: Sequence[str]) -> float:
    """longbook_choice_eng, with ``label`` = [answer text, answer letter].

    Tried in order: a prediction starting with A-D (that letter decides); a prediction equal to the text or the
    letter; what follows 'answer is:', 'answer:', 'answer is' or 'option is'; the first word that is a substring
    of 'ABCD'.
    """
    prediction = prediction.strip()
    if not prediction:
        return 0.0
    if prediction[0] in "ABCD":
        return float(prediction[0] in label)
    if prediction in label:
        return 1.0
    prediction = _collapse_spaces(_blank_out(prediction, ("\n", '"', "'", ".", ",", "?", "!", "{", "}")))
    rest = _text_after_cue(prediction, ("answer is:", "answer:", "answer is", "option is"))
    if rest is not None:
        return float(any(rest.startswith(option) for option in label))
    for word in prediction.split():
        if word in "ABCD":  # a substring test upstream: "AB" or "BCD" also end the search here
            return float(word in label)
    return 0.0


def code_debug_match(prediction: str, label: Sequence[str]) -> float:
    """code_debug, with ``label`` = [function name, answer letter].

    Right when the prediction starts with 'X.' or 'X:' for the answer letter X, or when what follows the first of
    'answer is:', 'is:', 'answer:', 'correct option is:' starts with the letter or the function name.
    """
    function_name, letter = label[0], label[1]
    prediction = prediction.strip()
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    prediction = _collapse_spaces(_blank_out(prediction, ("\n", "`", "'", '"', "-", "*", "Option", "option")))
    rest = _text_after_cue(prediction, ("answer is:", "is:", "answer:", "correct option is:"))
    return float(rest is not None and (rest.startswith(letter) or rest.startswith(function_name)))


# ---------------------------------------------------------------------------------------------------------------
# Dispatch by name

# Scored once per reference answer; an example scores the best of them (LongBench eval.py ``scorer``).
PER_ANSWER_METRICS: dict[str, Callable[[str, str], float]] = {
    "qa_f1_score": qa_f1_score,
    "qa_f1_zh_score": qa_f1_zh_score,
    "exact_match": exact_match,
    "rouge_score": rouge_score,
    "rouge_zh_score": rouge_zh_score,
    "rouge_l": rouge_l,
    "rouge_lsum": rouge_lsum,
    "count_score": count_score,
    "retrieval_score": retrieval_score,
    "retrieval_zh_score": retrieval_zh_score,
    "code_sim_score": code_sim_score,
    "first_int_match": first_int_match,
    "kv_retrieval_match": kv_retrieval_match,
    "code_run_match": code_run_match,
    "math_find_match": math_find_match,
}

# Read the whole answer list at once: InfiniteBench passes these scorers its label unsplit.
WHOLE_LABEL_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "choice_match": choice_match,
    "code_debug_match": code_debug_match,
    "dialogue_name_match": dialogue_name_match,
    "math_calc_score": math_calc_score,
}

METRIC_NAMES = sorted([*PER_ANSWER_METRICS, *WHOLE_LABEL_METRICS, "classification_score"])


def score(
    metric_name: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """Score one prediction against its reference answers with the named metric, in [0, 1].

    Per-answer metrics take the max over ``answers`` (0.0 for none); ``classification_score`` needs
    ``all_classes``; the whole-label metrics read ``answers`` as InfiniteBench's label.
    """
    if metric_name in WHOLE_LABEL_METRICS:
        return float(WHOLE_LABEL_METRICS[metric_name](prediction, answers))
    if metric_name == "classification_score":
        if all_classes is None:
            raise ValueError("classification_score needs all_classes, the list of class names of the task")
        metric = partial(classification_score, all_classes=all_classes)
    elif metric_name in PER_ANSWER_METRICS:
        metric = PER_ANSWER_METRICS[metric_name]
    else:
        raise ValueError(f"unknown metric {metric_name!r}; known metrics: {', '.join(METRIC_NAMES)}")
    return max((float(metric(prediction, answer)) for answer in answers), default=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Chunk selection: did the scorer keep the chunk that holds the answer? And how sure is a measured rate?


def needle_recalled(needle: tuple[int, int], kept: Sequence) -> bool:
    """Recall of one request: every token of the needle (context tokens [start, end)) lies in a kept span
    (each has ``start`` and ``end``). A needle cut in two by a chunk boundary needs both halves kept; a token
    that no span holds (dropped by the chunking) is never recalled."""
    start, end = needle
    if end <= start:
        raise ValueError(f"empty needle span {needle}")
    covered = set()
    for s in kept:
        covered.update(range(max(start, s.start), min(end, s.end)))
    return len(covered) == end - start


def needle_cut(needle: tuple[int, int], spans: Sequence) -> bool:
    """Whether no single span holds the whole needle: a chunk boundary cuts it."""
    start, end = needle
    return not any(s.start <= start and end <= s.end for s in spans)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate of ``hits`` out of ``n`` (sound near 0 and 1, where the normal one is not)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = 1.96) -> tuple[float, float, float]:
    """Mean of a - b over the same examples, with a 95% normal interval of the paired differences: two methods on
    the same examples differ only where they disagree, so this interval is narrower than two separate ones."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_difference needs two equally long, non-empty lists of outcomes on the same examples")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n, mean = len(d), sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    half = z * (var / n) ** 0.5
    return mean, mean - half, mean + half
