"""InfiniteBench for pdllm: its JSONL files, its prompt of each task, its generation length and its scorer.

Source: OpenBMB/InfiniteBench (formerly xinrongzhang2022/InfiniteBench), folder ``src/``: ``prompt.py`` (the
templates below, character for character), ``eval_utils.py`` (``create_prompt``: which record fields fill which
placeholder; ``get_answer``: the label of the choice tasks; ``DATA_NAME_TO_MAX_NEW_TOKENS``) and
``compute_scores.py`` (the scorer of each task, see ``pdllm.eval.metrics``).

The published files (the xinrongzhang2022/InfiniteBench dataset) hold one ``<task>.jsonl`` per task, one JSON
object a line with the fields ``id``, ``context``, ``input``, ``answer`` (a string, a number or a list of them;
for math_calc the list of expected values, possibly wrapped in one more list) and ``options`` (the four choices
of longbook_choice_eng and code_debug, else empty).

Two template sets: "open" is ``yarn_mistral_templates``, which upstream uses for the open models (YaRN-Mistral,
Yi-200K, ChatGLM3); "chat" is ``gpt4_templates``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from pdllm.eval.examples import (BenchmarkDataError, BenchmarkExample, check_limit, read_jsonl, require, require_strings,
                                 split_template, task_files)

# prompt.py yarn_mistral_templates
OPEN_TEMPLATES: dict[str, str] = {
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I "
        "will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is"
    ),
    "number_string": (
        "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about "
        "the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is"
    ),
    "kv_retrieval": (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n"
        "{input}"
    ),
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "longbook_choice_eng": (
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\nB. "
        "{OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is"
    ),
    "longbook_qa_eng": (
        "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion: "
        "{question}\nAnswer:"
    ),
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": (
        "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, "
        "4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:"
    ),
    "code_run": (
        "There is a function called {func} in the following Python code.\n\n{context}\n\nPlease compute "
        "the exact value of {func_call}. The value of {func_call} is"
    ),
    "code_debug": (
        "Following is a Python code where exactly one of the functions/methods has a deliberate error that "
        "makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. "
        "{OPTION_D}\n\nThe correct option is:"
    ),
    "longdialogue_qa_eng": (
        "Below is a dialogue script where one random occurrence of a character name is replaced with "
        "\"$$MASK$$\", and you should try to guess who that character is.\n\n{context}\n\nThe name that "
        "has been replaced with $$MASK$$ is likely"
    ),
}

# prompt.py gpt4_templates
CHAT_TEMPLATES: dict[str, str] = {
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I "
        "will quiz you about the important information there.\n\n{context}\n\n{input}"
    ),
    "number_string": (
        "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about "
        "the important information there.\n\n{context}\n\n{input}"
    ),
    "kv_retrieval": (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n"
        "{input}"
    ),
    "longbook_qa_eng": (
        "Read the book below and answer a question.\n\n{context}\n\nQuestion: {question}\n\nBe very "
        "concise."
    ),
    "longbook_choice_eng": (
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\n\nOnly one of the "
        "following options is correct, tell me the answer using one single letter (A, B, C, or D). Don't "
        "say anything else.\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}"
    ),
    "longbook_sum_eng": "Summarize the following book.\n\n{context}",
    "longbook_qa_chn": "请根据以下书籍回答我的问题。\n\n{context}\n\n问题：{question}\n请尽量简短地回答。",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    # The dict upstream has "Compute the intermediate values in the following long expression.\n\n{context}",
    # but create_prompt sends GPT-4 the bare expression (after a system message and a worked example).
    "math_calc": "{context}",
    "code_run": (
        "Following is a set of Python functions. There is a function called named {func}.\n\n{context}\n\n"
        "Please give me the exact number of the return value of {func_call}. Be concise. Your response "
        "must end with the final returned value."
    ),
    "code_debug": (
        "There is ONLY ONE function in the large project that is deliberately made to include an obvious "
        "error. Please find the function that contains the most obvious errors. I will give you four "
        "options to narrow your scope. You can inspect the options and think. Eventually, tell me the "
        "answer using one single letter (A, B, C, or D).\n\n{context}\n\nWhich funtion has deliberate "
        "error?\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nYou should first find the "
        "functions in the options. Repeat their content, inspect through code, and at last give me your "
        "answer for the function that has the deliberate and obvious error in A, B, C, or D."
    ),
    "longdialogue_qa_eng": (
        "Below is a dialogue script where one random occurrence of a character name is replaced with "
        "\"$$MASK$$\", and you should try to guess who that character is.\n\nThe dialogue:\n\n---\n\n"
        "{context}\n\n---\n\nEnd of dialogue.\n\nWhich character is most likely \"$$MASK$$\"? Just say the "
        "name used by the scriptwriter (before the colon marks) of one single character and nothing else."
    ),
}

TEMPLATE_SETS = {"open": OPEN_TEMPLATES, "chat": CHAT_TEMPLATES}

# eval_utils.py DATA_NAME_TO_MAX_NEW_TOKENS
MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 6,
    "number_string": 12,
    "kv_retrieval": 50,
    "longbook_sum_eng": 1200,
    "longbook_choice_eng": 40,
    "longbook_qa_eng": 40,
    "longbook_qa_chn": 40,
    "longdialogue_qa_eng": 40,
    "math_find": 3,
    "math_calc": 30000,
    "code_run": 5,
    "code_debug": 5,
}

# compute_scores.py get_score_one, by the names of pdllm.eval.metrics
METRICS: dict[str, str] = {
    "passkey": "first_int_match",
    "number_string": "first_int_match",
    "kv_retrieval": "kv_retrieval_match",
    "longbook_sum_eng": "rouge_lsum",
    "longbook_choice_eng": "choice_match",
    "longbook_qa_eng": "qa_f1_score",
    "longbook_qa_chn": "qa_f1_zh_score",
    "longdialogue_qa_eng": "dialogue_name_match",
    "math_find": "math_find_match",
    "math_calc": "math_calc_score",
    "code_run": "code_run_match",
    "code_debug": "code_debug_match",
}

TASKS: tuple[str, ...] = tuple(MAX_NEW_TOKENS)

_CHOICE_TASKS = frozenset({"longbook_choice_eng", "code_debug"})
_LETTERS = ("A", "B", "C", "D")
_FIELDS = "id, context, input, answer, options"


def load_infinitebench(
    path: str | Path,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    template_set: str = "open",
) -> list[BenchmarkExample]:
    """Read InfiniteBench examples from ``path``, a directory of ``<task>.jsonl`` files or one such file.

    ``tasks`` picks tasks (default: every task file the directory holds); ``limit`` keeps the first examples of
    each task; ``template_set`` is "open" or "chat". Raises ``BenchmarkDataError`` naming the file, line or field
    at fault.
    """
    check_limit(limit)
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"unknown InfiniteBench template set {template_set!r}; choose one of {sorted(TEMPLATE_SETS)}")
    templates = TEMPLATE_SETS[template_set]
    examples = []
    for task, file in task_files(path, TASKS, tasks, "InfiniteBench"):
        examples += [_example(task, templates[task], record, where) for where, record in read_jsonl(file, limit)]
    return examples


def _example(task: str, template: str, record: dict, where: str) -> BenchmarkExample:
    """One record of ``<task>.jsonl`` as a BenchmarkExample."""
    context = require(record, "context", str, "a string", where, _FIELDS)
    prefix, question = split_template(template, **_template_fields(task, record, where))
    return BenchmarkExample(
        id=str(require(record, "id", (int, str), "an integer or a string", where, _FIELDS)),
        task=task,
        prefix=prefix,
        context=context,
        question=question,
        answers=_answers(task, record, where),
        all_classes=None,
        max_new_tokens=MAX_NEW_TOKENS[task],
        metric_name=METRICS[task],
    )


def _template_fields(task: str, record: dict, where: str) -> dict[str, str]:
    """The values of the placeholders other than {context}, as create_prompt fills them."""
    text = require(record, "input", str, "a string", where, _FIELDS)
    fields = {"input": text, "question": text}
    if task in _CHOICE_TASKS:
        fields.update(zip(("OPTION_A", "OPTION_B", "OPTION_C", "OPTION_D"), _options(record, where)))
    if task == "code_run":
        fields.update(_function_call(text, where))
    if task == "math_find":
        fields["prefix"] = _math_find_prefix(text, where)
    return fields


def _options(record: dict, where: str) -> list[str]:
    options = require_strings(record, "options", where, _FIELDS)
    if len(options) != 4:
        raise BenchmarkDataError(f"{where}: field 'options' must hold the four choices A-D, got {len(options)}")
    return options


def _function_call(text: str, where: str) -> dict[str, str]:
    """code_run: the call asked about, e.g. {"func": "func_12", "func_call": "func_12(-3)"}."""
    calls = re.findall(r"func_[0-9]+\(-?[0-9]+\)", text)
    if not calls:
        raise BenchmarkDataError(f"{where}: a code_run input must name the call to evaluate, like func_12(-3)")
    return {"func": calls[0].split("(")[0], "func_call": calls[0]}


def _math_find_prefix(text: str, where: str) -> str:
    """math_find: 'What is <the target> in the following list?', the target read from 'The <target> of'."""
    targets = re.findall(r"The .+ of", text)
    if not targets:
        raise BenchmarkDataError(f"{where}: a math_find input must say what to find, as in 'The largest number of'")
    return f"What is {targets[0].lower()[:-3]} in the following list?"


def _answers(task: str, record: dict, where: str) -> list[str]:
    """The reference answers as strings; for the choice tasks [answer text, answer letter], as get_answer builds."""
    answer = require(record, "answer", (str, int, float, list), "a string, a number or a list", where, _FIELDS)
    if task in _CHOICE_TASKS:
        return _choice_label(answer, _options(record, where), where)
    values = answer if isinstance(answer, list) else [answer]
    if task == "math_calc" and values and isinstance(values[0], list):
        values = values[0]
    if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
        raise BenchmarkDataError(f"{where}: field 'answer' must be a non-empty string, number or list of them")
    return [str(value) for value in values]


def _choice_label(answer: str | int | float | list, options: list[str], where: str) -> list[str]:
    if isinstance(answer, list) and len(answer) == 2 and answer[1] in _LETTERS and isinstance(answer[0], str):
        return answer
    text = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
    if text not in options:
        raise BenchmarkDataError(f"{where}: field 'answer' ({text!r}) must be one of the options {options}")
    return [text, _LETTERS[options.index(text)]]
