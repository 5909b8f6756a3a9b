"""LongBench (v1) for pdllm: its JSONL files, its prompt of each task, its generation length and its metric.

Source: THUDM/LongBench, folder ``LongBench/``: ``config/dataset2prompt.json`` (the templates below, character
for character, typos such as "asconcisely" included), ``config/dataset2maxlen.json``, ``eval.py``
(``dataset2metric``, and the rule that trec, triviaqa, samsum and lsht score only the first line of a prediction)
and ``pred.py`` (the prompt is ``template.format(**record)``; LongBench-E reads ``<task>_e`` with the same
templates).

The published files (``data.zip`` of the THUDM/LongBench dataset) hold one ``<task>.jsonl`` per task, or
``<task>_e.jsonl`` for LongBench-E, one JSON object a line with the fields ``input``, ``context``, ``answers``
(a list), ``length``, ``dataset``, ``language``, ``all_classes`` (a list for trec and lsht, else null) and
``_id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pdllm.eval.examples import (BenchmarkExample, check_limit, read_jsonl, require, require_strings, split_template,
                                 task_files)

_MULTI_DOC_QA = (
    "Answer the question based on the given passages. Only give me the answer and do not output any "
    "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
    "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
    "Answer:"
)

# config/dataset2prompt.json
PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question asconcisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
        "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
        "{input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based on the "
        "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
        "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n "
        "Answer the question based on the above article as concisely as you can, using a single phrase or "
        "sentence if possible. If the question cannot be answered based on the information in the article, "
        "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\nQuestion: "
        "{input}\nAnswer:"
    ),
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": _MULTI_DOC_QA,
    "2wikimqa": _MULTI_DOC_QA,
    "musique": _MULTI_DOC_QA,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the "
        "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
        "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n{input}"
    ),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter "
        "the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph "
        "1\", \"Paragraph 2\", etc.\n\nThe answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# config/dataset2maxlen.json
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

# eval.py dataset2metric, by the names of pdllm.eval.metrics
METRICS: dict[str, str] = {
    "narrativeqa": "qa_f1_score",
    "qasper": "qa_f1_score",
    "multifieldqa_en": "qa_f1_score",
    "multifieldqa_zh": "qa_f1_zh_score",
    "hotpotqa": "qa_f1_score",
    "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score",
    "dureader": "rouge_zh_score",
    "gov_report": "rouge_score",
    "qmsum": "rouge_score",
    "multi_news": "rouge_score",
    "vcsum": "rouge_zh_score",
    "trec": "classification_score",
    "triviaqa": "qa_f1_score",
    "samsum": "rouge_score",
    "lsht": "classification_score",
    "passage_count": "count_score",
    "passage_retrieval_en": "retrieval_score",
    "passage_retrieval_zh": "retrieval_zh_score",
    "lcc": "code_sim_score",
    "repobench-p": "code_sim_score",
}

TASKS: tuple[str, ...] = tuple(PROMPTS)

# The tasks that LongBench-E covers (pred.py), each in a <task>_e.jsonl file.
LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
    "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip

# eval.py: for these few-shot tasks only the first line of a prediction is scored.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

_CLASSIFICATION_TASKS = frozenset(task for task, metric in METRICS.items() if metric == "classification_score")
_FIELDS = "input, context, answers, length, dataset, language, all_classes, _id"


def load_longbench(
    path: str | Path,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    longbench_e: bool = False,
) -> list[BenchmarkExample]:
    """Read LongBench examples from ``path``, a directory of ``<task>.jsonl`` files or one such file.

    ``tasks`` picks tasks (default: every task file the directory holds); ``limit`` keeps the first examples of
    each task; ``longbench_e`` reads the LongBench-E files ``<task>_e.jsonl`` instead. Raises
    ``BenchmarkDataError`` naming the file, line or field at fault.
    """
    check_limit(limit)
    if longbench_e:
        known, suffix, hint = LONGBENCH_E_TASKS, "_e", ""
    else:
        known, suffix, hint = TASKS, "", " LongBench-E files (<task>_e.jsonl) need longbench_e=True."
    examples = []
    for task, file in task_files(path, known, tasks, "LongBench", suffix, hint):
        examples += [_example(task, record, where) for where, record in read_jsonl(file, limit)]
    return examples


def _example(task: str, record: dict, where: str) -> BenchmarkExample:
    """One record of ``<task>.jsonl`` as a BenchmarkExample."""
    context = require(record, "context", str, "a string", where, _FIELDS)
    prefix, question = split_template(
        PROMPTS[task], input=require(record, "input", str, "a string", where, _FIELDS)
    )
    if task in _CLASSIFICATION_TASKS:
        all_classes = require_strings(record, "all_classes", where, _FIELDS)
    else:
        all_classes = record.get("all_classes")
    length = record.get("length")
    return BenchmarkExample(
        id=require(record, "_id", str, "a string", where, _FIELDS),
        task=task,
        prefix=prefix,
        context=context,
        question=question,
        answers=require_strings(record, "answers", where, _FIELDS),
        all_classes=all_classes,
        max_new_tokens=MAX_NEW_TOKENS[task],
        metric_name=METRICS[task],
        first_line_only=task in FIRST_LINE_TASKS,
        length=length if isinstance(length, int) else None,
    )
