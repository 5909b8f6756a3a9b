"""pdllm.eval.metrics on examples worked out by hand.

The functions were also compared, on 20,000 random prediction/answer pairs, with the upstream code they
reproduce (LongBench metrics.py with fuzzywuzzy and rouge 1.0.1; InfiniteBench compute_scores.py; Google
rouge_score); that comparison needs those packages and is not repeated here.
"""

import pytest

from pdllm.eval import metrics


def approx(value):
    return pytest.approx(value, abs=1e-6)


# -- normalisation and F1 --------------------------------------------------------------------------------------


def test_normalize_answer_lowercases_drops_punctuation_articles_and_extra_spaces():
    assert metrics.normalize_answer("The Cat, sat!  on a mat.") == "cat sat on mat"
    assert metrics.normalize_answer("An apple; THE end") == "apple end"
    assert metrics.normalize_answer("theory of anything") == "theory of anything"  # whole words only


def test_normalize_zh_answer_drops_chinese_punctuation_and_all_spaces():
    assert metrics.normalize_zh_answer("海港 上方，《悬崖》！") == "海港上方《悬崖"  # LongBench's list lacks 《


def test_qa_f1_by_hand():
    # "cat sat" vs "cat sat on": 2 common tokens, precision 2/2, recall 2/3, F1 = 2 * 1 * 2/3 / (5/3) = 0.8
    assert metrics.qa_f1_score("the cat sat", "a cat sat on") == approx(0.8)
    assert metrics.qa_f1_score("dog", "a cat sat on") == 0.0
    assert metrics.qa_f1_score("Cat, sat.", "the cat sat") == approx(1.0)


def test_qa_f1_counts_repeated_tokens_once_per_occurrence():
    # "cat cat cat" vs "cat sat": overlap 1, precision 1/3, recall 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert metrics.qa_f1_score("cat cat cat", "cat sat") == approx(0.4)


def test_qa_f1_zh_is_character_f1():
    # 海港上方 vs 悬崖上方: 2 of 4 characters in common each way, F1 0.5; punctuation does not count
    assert metrics.qa_f1_zh_score("海港上方。", "悬崖，上方") == approx(0.5)


def test_exact_match_after_normalisation():
    assert metrics.exact_match("The Cat.", "cat") == 1.0
    assert metrics.exact_match("cats", "cat") == 0.0


# -- LongBench's task metrics ----------------------------------------------------------------------------------


def test_count_score_is_the_share_of_right_numbers():
    assert metrics.count_score("There are 3 or 4 paragraphs, I think 3", "3") == approx(2 / 3)
    assert metrics.count_score("no idea", "3") == 0.0


def test_retrieval_scores_read_the_paragraph_number_of_the_answer():
    assert metrics.retrieval_score("Paragraph 2, not Paragraph 12", "Paragraph 2") == approx(0.5)
    assert metrics.retrieval_zh_score("答案是：段落2", "段落2") == 1.0
    with pytest.raises(ValueError, match="does not name a paragraph"):
        metrics.retrieval_score("Paragraph 2", "the second one")


def test_classification_score_shares_credit_among_matched_classes():
    classes = ["Individual", "City", "Country"]
    assert metrics.classification_score("City", "City", classes) == 1.0
    assert metrics.classification_score("City or Country", "City", classes) == 0.5
    assert metrics.classification_score("Country", "City", classes) == 0.0
    assert metrics.classification_score("no class named", "City", classes) == 0.0


def test_classification_score_drops_partial_matches_the_way_longbench_does():
    # "Other" is part of the answer and dropped; upstream then skips "location", which stays: 2 matches, 1/2.
    classes = ["Other", "location", "Other location"]
    assert metrics.classification_score("Other location", "Other location", classes) == 0.5
    # Without the skipped neighbour the partial match is simply dropped.
    assert metrics.classification_score("Other location", "Other location", ["Other", "Other location"]) == 1.0


def test_code_sim_score_takes_the_first_plain_code_line():
    prediction = "```python\n# finish the function\n    return total\nprint(add(1, 2))"
    assert metrics.code_sim_score(prediction, "    return total") == 1.0
    assert metrics.code_sim_score("\n\nabcd", "abce") == approx(0.75)  # SequenceMatcher: 2 * 3 / 8
    assert metrics.code_sim_score("abc", "abd") == approx(0.67)  # 2 * 2 / 6 = 66.7%, rounded like fuzz.ratio
    assert metrics.code_sim_score("# only a comment", "return total") == 0.0


# -- ROUGE -----------------------------------------------------------------------------------------------------


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 tokens both ways
    assert metrics.rouge_l("The cat sat on the mat", "the cat lay on the mat") == approx(5 / 6)
    assert metrics.rouge_l("", "the cat") == 0.0


def test_rouge_score_counts_distinct_words_like_pltrdy_rouge():
    # one sentence each; distinct words 3 and 5; LCS words {the, cat, sat}: P 1, R 3/5, F 0.75
    assert metrics.rouge_score("the cat sat", "the cat sat on the mat") == approx(0.75)
    # repeated words count once: hyp {the}, ref {the, cat}, hit {the}: P 1, R 1/2
    assert metrics.rouge_score("the the the", "the cat") == approx(2 / 3)
    assert metrics.rouge_l("the the the", "the cat") == approx(0.4)  # textbook ROUGE-L differs
    assert metrics.rouge_score("", "the cat") == 0.0
    assert metrics.rouge_score("The cat", "the cat") == approx(0.5)  # case is kept: only "cat" is shared


def test_rouge_zh_score_uses_characters_as_words():
    assert metrics.rouge_zh_score("海港上方", "悬崖上方") == approx(0.5)


def test_rouge_lsum_takes_the_union_over_predicted_lines():
    # The whole-text LCS covers half of each; line by line every reference token is hit.
    prediction, reference = "on the mat\nthe cat sat", "the cat sat on the mat"
    assert metrics.rouge_l(prediction, reference) == approx(0.5)
    assert metrics.rouge_lsum(prediction, reference) == approx(1.0)
    assert metrics.rouge_lsum("\n\n", reference) == 0.0


# -- InfiniteBench's task scorers ------------------------------------------------------------------------------


def test_first_int_match_reads_the_first_number_only():
    assert metrics.first_int_match("The pass key is 71432. Remember it.", "71432") == 1.0
    assert metrics.first_int_match("Key 7, then 71432", "71432") == 0.0


def test_kv_retrieval_match_looks_for_the_value_as_a_word():
    assert metrics.kv_retrieval_match('The value is "f1ec-44".', "f1ec-44") == 1.0
    assert metrics.kv_retrieval_match("The value is f1ec-4", "f1ec-44") == 0.0


def test_code_run_match_reads_the_last_word():
    assert metrics.code_run_match("The return value is: -3.", "-3") == 1.0
    assert metrics.code_run_match("-3 is the return value", "-3") == 0.0
    assert metrics.code_run_match("", "-3") == 0.0


def test_math_scorers():
    assert metrics.math_find_match("88, the largest", "88") == 1.0
    assert metrics.math_find_match("It is 88.5", "88") == 0.0
    # 79 and 59 right, then a miss: 2 of 3 values
    assert metrics.math_calc_score("[79, 59, 70]", ["79", "59", "73"]) == approx(2 / 3)
    assert metrics.math_calc_score("[79, -59, 73]", ["79", "-59", "73"]) == approx(1 / 3)  # minus signs are lost


def test_dialogue_name_match_uses_the_first_answer_only():
    assert metrics.dialogue_name_match("It is Tom.", ["TOM", "Tom Keeper"]) == 1.0
    assert metrics.dialogue_name_match("It is Tom.", ["Tom Keeper", "TOM"]) == 0.0


def test_choice_match():
    label = ["Walking Georgie", "A"]
    assert metrics.choice_match("A. Walking Georgie", label) == 1.0
    assert metrics.choice_match("B. Light housework", label) == 0.0
    assert metrics.choice_match("Walking Georgie", label) == 1.0
    assert metrics.choice_match("The answer is: A", label) == 1.0
    assert metrics.choice_match("I would say A", label) == 1.0
    assert metrics.choice_match("", label) == 0.0


def test_code_debug_match():
    label = ["repack", "B"]
    assert metrics.code_debug_match("B. repack", label) == 1.0
    assert metrics.code_debug_match("The answer is: repack", label) == 1.0
    assert metrics.code_debug_match("The correct option is: C", label) == 0.0
    assert metrics.code_debug_match("I think B", label) == 0.0


# -- the dispatcher --------------------------------------------------------------------------------------------


def test_score_takes_the_best_answer():
    assert metrics.score("qa_f1_score", "the cat sat", ["dog", "a cat sat on"]) == approx(0.8)
    assert metrics.score("qa_f1_score", "the cat sat", []) == 0.0


def test_score_passes_the_whole_label_to_label_scorers():
    assert metrics.score("choice_match", "A", ["Walking Georgie", "A"]) == 1.0
    assert metrics.score("math_calc_score", "79 59", ["79", "59"]) == 1.0


def test_score_classification_needs_all_classes():
    assert metrics.score("classification_score", "City", ["City"], ["City", "Country"]) == 1.0
    with pytest.raises(ValueError, match="needs all_classes"):
        metrics.score("classification_score", "City", ["City"])


def test_score_unknown_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown metric 'f1'; known metrics: .*qa_f1_score"):
        metrics.score("f1", "a", ["a"])
