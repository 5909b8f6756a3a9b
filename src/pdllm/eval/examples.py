"""The example type every benchmark loader returns, and the file handling the loaders share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pdllm.eval.metrics as metrics


class BenchmarkDataError(ValueError):
    """Benchmark data that cannot be used as it is; the message names the file, line or field, and the fix."""


@dataclass(frozen=True)
class BenchmarkExample:
    """One long-context request, split where pdllm's chunked prefill needs it.

    ``prefix + context + question`` is exactly the prompt the benchmark's own scripts build: the instruction
    before the context, the context (the only part chunked prefill splits into chunks), and the question with the
    answer cue after it. ``answers`` are the reference answers (InfiniteBench's label for its whole-label
    scorers: [text, letter] for the choice tasks, the expected values in order for math_calc); ``all_classes``
    the class names of a classification task; ``first_line_only`` says the task scores only the first line of a
    prediction; ``length`` is LongBench's length of the example (None where the benchmark gives none).
    """

    id: str
    task: str
    prefix: str
    context: str
    question: str
    answers: list[str]
    all_classes: list[str] | None
    max_new_tokens: int
    metric_name: str
    first_line_only: bool = False
    length: int | None = None

    @property
    def prompt(self) -> str:
        return self.prefix + self.context + self.question

    def score(self, prediction: str) -> float:
        """The benchmark's score of one prediction, in [0, 1]."""
        if self.first_line_only:
            prediction = prediction.lstrip("\n").split("\n")[0]
        return metrics.score(self.metric_name, prediction, self.answers, self.all_classes)


def split_template(template: str, **fields: str) -> tuple[str, str]:
    """Fill a prompt template around its one ``{context}``: (text before the context, text after it).

    Formatting each side separately gives the same text as ``template.format(context=..., **fields)``.
    """
    before, placeholder, after = template.partition("{context}")
    if not placeholder or "{context}" in after:
        raise ValueError(f"a prompt template needs exactly one {{context}}: {template!r}")
    return before.format(**fields), after.format(**fields)


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative number of examples per task or None, got {limit!r}")


def task_files(
    path: str | Path,
    known_tasks: Sequence[str],
    tasks: Sequence[str] | None,
    benchmark: str,
    suffix: str = "",
    naming_hint: str = "",
) -> list[tuple[str, Path]]:
    """The (task, file) pairs to read from ``path``: a directory of ``<task><suffix>.jsonl`` files, or one file.

    A single file's task is its name without ``.jsonl`` and, if present, ``suffix``. ``tasks`` selects tasks;
    None takes every known task the directory holds, in the benchmark's order. ``naming_hint`` ends the message
    about a file name that names no task.
    """
    path = Path(path)
    wanted = _checked_tasks(tasks, known_tasks, benchmark)
    if path.is_file():
        return [(_task_of_file(path, known_tasks, wanted, benchmark, suffix, naming_hint), path)]
    if not path.is_dir():
        raise BenchmarkDataError(
            f"{benchmark} data not found: {path} does not exist. Pass the directory that holds the "
            f"{benchmark} <task>{suffix}.jsonl files, or one of those files."
        )
    files = [(task, path / f"{task}{suffix}.jsonl") for task in (known_tasks if wanted is None else wanted)]
    if wanted is None:
        files = [(task, file) for task, file in files if file.is_file()]
        if not files:
            raise BenchmarkDataError(
                f"no {benchmark} task files in {path}: expected files named <task>{suffix}.jsonl with <task> "
                f"one of {', '.join(known_tasks)}."
            )
    for task, file in files:
        if not file.is_file():
            raise BenchmarkDataError(
                f"{benchmark} file {file} is missing (task {task!r}): put {file.name} in {path} or leave "
                f"{task!r} out of the tasks."
            )
    return files


def _checked_tasks(tasks: Sequence[str] | None, known_tasks: Sequence[str], benchmark: str) -> list[str] | None:
    if tasks is None:
        return None
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [task for task in tasks if task not in known_tasks]
    if unknown:
        raise BenchmarkDataError(
            f"unknown {benchmark} task {unknown[0]!r}; known tasks: {', '.join(known_tasks)}."
        )
    return list(tasks)


def _task_of_file(
    file: Path, known_tasks: Sequence[str], wanted: list[str] | None, benchmark: str, suffix: str, naming_hint: str
) -> str:
    name = file.name.removesuffix(".jsonl")
    if name not in known_tasks and suffix:
        name = name.removesuffix(suffix)
    if not file.name.endswith(".jsonl") or name not in known_tasks:
        raise BenchmarkDataError(
            f"cannot tell the {benchmark} task of {file}: name the file <task>{suffix}.jsonl with <task> one "
            f"of {', '.join(known_tasks)}.{naming_hint}"
        )
    if wanted is not None and name not in wanted:
        raise BenchmarkDataError(
            f"{file} holds {benchmark} task {name!r}, which is not among the requested tasks {wanted}: pass "
            f"the directory instead, or request {name!r}."
        )
    return name


def read_jsonl(file: Path, limit: int | None) -> Iterator[tuple[str, dict]]:
    """Yield ('<file>:<line>', record) for the first ``limit`` records of a JSONL file; blank lines are skipped."""
    read = 0
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and read >= limit:
                return
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise BenchmarkDataError(
                    f"{where}: not valid JSON ({error.msg}, column {error.colno}); every line must be one "
                    f"JSON object: fix or delete this line."
                ) from None
            if not isinstance(record, dict):
                raise BenchmarkDataError(
                    f"{where}: expected a JSON object, got a {type(record).__name__}; every line must be one "
                    f"JSON object: fix or delete this line."
                )
            yield where, record
            read += 1


def require(record: dict, field: str, kind: type | tuple[type, ...], what: str, where: str, fields: str):
    """``record[field]``, checked to be an instance of ``kind`` (described as ``what`` in the error message).

    ``fields`` lists the fields of a published record, for the message about a missing one.
    """
    if field not in record:
        raise BenchmarkDataError(
            f"{where}: missing field {field!r}; a record in the published format has the fields {fields}: "
            f"add the field or use the published file."
        )
    value = record[field]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BenchmarkDataError(f"{where}: field {field!r} must be {what}, got {json.dumps(value)[:80]}")
    return value


def require_strings(record: dict, field: str, where: str, fields: str) -> list[str]:
    """``record[field]`` checked to be a list of strings."""
    value = require(record, field, list, "a list of strings", where, fields)
    if not all(isinstance(item, str) for item in value):
        raise BenchmarkDataError(f"{where}: field {field!r} must be a list of strings, got {json.dumps(value)[:80]}")
    return value
