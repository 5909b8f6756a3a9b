"""LongBench and InfiniteBench loaders on the hand-written fixtures in tests/fixtures, in the published formats."""

import hashlib
import json
from pathlib import Path

import pytest

from pdllm.eval import BenchmarkDataError, infinitebench, load_infinitebench, load_longbench, longbench

FIXTURES = Path(__file__).parent / "fixtures"
LONGBENCH_DIR = FIXTURES / "longbench"
INFINITEBENCH_DIR = FIXTURES / "infinitebench"


def records(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]


def digest(table: dict) -> str:
    return hashlib.sha256(json.dumps(table, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def first_of_each_task(examples) -> dict:
    by_task = {}
    for example in examples:
        by_task.setdefault(example.task, example)
    return by_task


def write_jsonl(file: Path, *lines: str) -> Path:
    file.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return file


# -- the tables match upstream ---------------------------------------------------------------------------------


def test_tables_hash_like_the_upstream_files():
    # Digests of THUDM/LongBench 2e00731 LongBench/config/dataset2prompt.json and dataset2maxlen.json, and of
    # OpenBMB/InfiniteBench 88b3daa src/prompt.py yarn_mistral_templates and gpt4_templates.
    assert digest(longbench.PROMPTS) == "e7d865d712fe45e2455f5e864ac474001d7758d68d349e76ffbcdd382483358f"
    assert digest(longbench.MAX_NEW_TOKENS) == "39a79d9491ead3dc8bcea6dbd8b963b29248eb4c344dde1e176b0a58b4e758a9"
    assert digest(infinitebench.OPEN_TEMPLATES) == "ede60cb9c1c20f1de5de4cd90ee9c5ac7bcd111fc70ac9c7954ac93e9b790bf5"
    upstream_chat = {
        **infinitebench.CHAT_TEMPLATES,
        "math_calc": "Compute the intermediate values in the following long expression.\n\n{context}",
    }
    assert digest(upstream_chat) == "3debaa609e174553108963e1ca35e9ae11ff3621ac6617ea2d9424b110c08155"


def test_every_task_has_a_length_and_a_metric():
    assert set(longbench.MAX_NEW_TOKENS) == set(longbench.METRICS) == set(longbench.TASKS)
    assert set(infinitebench.METRICS) == set(infinitebench.TASKS)
    assert set(infinitebench.OPEN_TEMPLATES) == set(infinitebench.CHAT_TEMPLATES) == set(infinitebench.TASKS)


# -- LongBench -------------------------------------------------------------------------------------------------


def test_longbench_reads_every_task_file_of_a_directory():
    examples = load_longbench(LONGBENCH_DIR)
    tasks = [example.task for example in examples]
    assert tasks == [
        "narrativeqa", "narrativeqa", "multifieldqa_zh", "gov_report", "trec",
        "passage_retrieval_en", "lcc", "repobench-p",
    ]  # fmt: skip
    first = examples[0]
    assert first.id == "3f1c0e9a8b7d6c5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c"
    assert first.answers == ["Tom", "Her brother Tom"]
    assert (first.max_new_tokens, first.metric_name, first.length) == (128, "qa_f1_score", 14)
    assert first.context == "Mara keeps the lighthouse on the cliff. Her brother Tom owns it."
    assert first.prefix.startswith("You are given a story") and first.prefix.endswith("Story: ")
    assert first.question.endswith("Question: Who owns the lighthouse?\n\nAnswer:")


@pytest.mark.parametrize("file", sorted(LONGBENCH_DIR.glob("*.jsonl")), ids=lambda f: f.name)
def test_longbench_prompt_is_the_template_filled_with_the_record(file):
    examples = load_longbench(file, longbench_e=file.stem.endswith("_e"))
    for example, record in zip(examples, records(file), strict=True):
        assert example.prompt == longbench.PROMPTS[example.task].format(**record)
        assert example.context == record["context"]


@pytest.mark.parametrize("task", longbench.TASKS)
def test_longbench_split_holds_for_every_template(task, tmp_path):
    answer = "段落1" if task == "passage_retrieval_zh" else "Paragraph 1"
    record = {
        "input": "Q {x}?", "context": "C {y}\n\nmore", "answers": [answer], "length": 3,
        "dataset": task, "language": "en", "all_classes": ["A", "B"], "_id": "x",
    }  # fmt: skip
    file = write_jsonl(tmp_path / f"{task}.jsonl", json.dumps(record))
    [example] = load_longbench(file)
    assert example.prefix + example.context + example.question == longbench.PROMPTS[task].format(**record)
    assert example.context == record["context"]
    assert example.score("no answer") >= 0.0


def test_longbench_task_filter_and_limit():
    examples = load_longbench(LONGBENCH_DIR, tasks=["trec", "narrativeqa"], limit=1)
    assert [(e.task, e.id[:4]) for e in examples] == [("trec", "e2f1"), ("narrativeqa", "3f1c")]
    assert load_longbench(LONGBENCH_DIR, tasks=["narrativeqa"], limit=0) == []
    assert len(load_longbench(LONGBENCH_DIR, tasks="narrativeqa")) == 2


def test_longbench_e_reads_the_e_files_with_the_same_templates():
    [example] = load_longbench(LONGBENCH_DIR, longbench_e=True)
    assert (example.task, example.answers, example.max_new_tokens) == ("qasper", ["SQuAD"], 128)
    assert example.prefix.startswith("You are given a scientific article")


def test_longbench_examples_score_with_the_task_rules():
    by_task = first_of_each_task(load_longbench(LONGBENCH_DIR))
    assert by_task["narrativeqa"].score("Tom.") == 1.0
    assert by_task["trec"].all_classes == ["Individual", "Distance, linear measure", "City", "Country"]
    assert by_task["trec"].score("City\nCountry") == 1.0  # trec scores only the first line
    assert by_task["trec"].score("City Country") == 0.5
    assert by_task["passage_retrieval_en"].score("Paragraph 2") == 1.0
    assert by_task["lcc"].score("    return total\n") == 1.0
    assert by_task["multifieldqa_zh"].score("在海港上方的悬崖上") > 0.8


# -- InfiniteBench ---------------------------------------------------------------------------------------------

# What create_prompt fills in besides {context}, written out by hand for each fixture.
INFINITEBENCH_FIELDS = {
    "passkey": {"input": "What is the pass key?"},
    "number_string": {"input": "What is the sequence of digits?"},
    "kv_retrieval": {"input": 'Key: "2b11-33"\nThe value associated with the specified key is: '},
    "longbook_sum_eng": {},
    "longbook_choice_eng": {
        "question": "What does Mara do every morning?",
        "OPTION_A": "Walking Georgie", "OPTION_B": "Light housework", "OPTION_C": "Baking bread",
        "OPTION_D": "Writing letters",
    },  # fmt: skip
    "longbook_qa_eng": {"question": "When did Tom leave the harbour?", "input": "When did Tom leave the harbour?"},
    "longbook_qa_chn": {"question": "汤姆什么时候离开了海港？"},
    "longdialogue_qa_eng": {},
    "math_find": {
        "prefix": "What is the largest number in the following list?",
        "input": "You should answer with only one number, no other words. The largest number of the list is: ",
    },
    "math_calc": {},
    "code_run": {"func": "func_2", "func_call": "func_2(-2)"},
    "code_debug": {"OPTION_A": "parse", "OPTION_B": "repack", "OPTION_C": "main", "OPTION_D": "load"},
}


def test_infinitebench_reads_all_twelve_tasks():
    examples = load_infinitebench(INFINITEBENCH_DIR)
    assert [e.task for e in examples] == ["passkey", *infinitebench.TASKS]
    by_task = first_of_each_task(examples)
    assert by_task["passkey"].id == "0" and by_task["passkey"].answers == ["71432"]
    assert by_task["kv_retrieval"].answers == ["f1ec-44"]  # a plain string answer becomes a list
    assert by_task["longbook_choice_eng"].answers == ["Walking Georgie", "A"]
    assert by_task["code_debug"].answers == ["repack", "B"]
    assert by_task["math_calc"].answers == ["79", "59", "73"]
    assert by_task["code_run"].answers == ["-3"]
    assert (by_task["longbook_sum_eng"].max_new_tokens, by_task["longbook_sum_eng"].metric_name) == (1200, "rouge_lsum")


@pytest.mark.parametrize("template_set", ["open", "chat"])
@pytest.mark.parametrize("task", infinitebench.TASKS)
def test_infinitebench_prompt_is_the_template_filled_like_upstream(task, template_set):
    file = INFINITEBENCH_DIR / f"{task}.jsonl"
    examples = load_infinitebench(file, template_set=template_set)
    template = infinitebench.TEMPLATE_SETS[template_set][task]
    for example, record in zip(examples, records(file), strict=True):
        expected = template.format(context=record["context"], **INFINITEBENCH_FIELDS[task])
        assert example.prefix + example.context + example.question == expected
        assert example.context == record["context"]


def test_infinitebench_chat_math_calc_is_the_bare_expression():
    [example] = load_infinitebench(INFINITEBENCH_DIR / "math_calc.jsonl", template_set="chat")
    assert (example.prefix, example.context, example.question) == ("", "79 - 20 + 14", "")


def test_infinitebench_examples_score_with_the_task_scorers():
    by_task = first_of_each_task(load_infinitebench(INFINITEBENCH_DIR))
    assert by_task["passkey"].score("71432.") == 1.0
    assert by_task["kv_retrieval"].score('"f1ec-44"') == 1.0
    assert by_task["longbook_choice_eng"].score("A") == 1.0
    assert by_task["code_debug"].score("B. repack") == 1.0
    assert by_task["code_run"].score("The return value is: -3") == 1.0
    assert by_task["math_find"].score("88") == 1.0
    assert by_task["math_calc"].score("[79, 59, 73]") == 1.0
    assert by_task["longdialogue_qa_eng"].score("Tom") == 1.0
    assert by_task["longbook_qa_chn"].score("春天") == 1.0
    assert 0.0 < by_task["longbook_sum_eng"].score("Mara keeps a lighthouse.") < 1.0


def test_infinitebench_task_filter_and_limit():
    assert [e.task for e in load_infinitebench(INFINITEBENCH_DIR, tasks=["passkey"], limit=1)] == ["passkey"]
    assert len(load_infinitebench(INFINITEBENCH_DIR, tasks=["passkey"])) == 2


# -- errors ----------------------------------------------------------------------------------------------------

GOOD_LONGBENCH = {
    "input": "Who?", "context": "Tom.", "answers": ["Tom"], "length": 1, "dataset": "narrativeqa",
    "language": "en", "all_classes": None, "_id": "a",
}  # fmt: skip


def line(**changes) -> str:
    record = {key: value for key, value in {**GOOD_LONGBENCH, **changes}.items() if value is not ...}
    return json.dumps(record)


def test_missing_path(tmp_path):
    with pytest.raises(BenchmarkDataError, match=r"LongBench data not found: .*nowhere does not exist"):
        load_longbench(tmp_path / "nowhere")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(BenchmarkDataError, match=r"unknown LongBench task 'narativeqa'; known tasks: narrativeqa, "):
        load_longbench(LONGBENCH_DIR, tasks=["narativeqa"])
    with pytest.raises(BenchmarkDataError, match=r"unknown InfiniteBench task 'passkeys'; known tasks: passkey, "):
        load_infinitebench(INFINITEBENCH_DIR, tasks=["passkeys"])


def test_missing_task_file():
    with pytest.raises(BenchmarkDataError, match=r"qmsum\.jsonl is missing \(task 'qmsum'\): put qmsum\.jsonl in"):
        load_longbench(LONGBENCH_DIR, tasks=["qmsum"])


def test_directory_without_task_files(tmp_path):
    write_jsonl(tmp_path / "notes.jsonl", "{}")
    with pytest.raises(BenchmarkDataError, match=r"no LongBench task files in .*<task>\.jsonl with <task> one of"):
        load_longbench(tmp_path)


def test_file_named_after_no_task(tmp_path):
    with pytest.raises(BenchmarkDataError, match=r"cannot tell the LongBench task of .*notes\.jsonl"):
        load_longbench(write_jsonl(tmp_path / "notes.jsonl", line()))
    with pytest.raises(BenchmarkDataError, match=r"need longbench_e=True"):
        load_longbench(LONGBENCH_DIR / "qasper_e.jsonl")


def test_file_of_a_task_not_requested():
    with pytest.raises(BenchmarkDataError, match=r"holds LongBench task 'lcc', which is not among the requested"):
        load_longbench(LONGBENCH_DIR / "lcc.jsonl", tasks=["trec"])


def test_malformed_json_names_file_and_line(tmp_path):
    file = write_jsonl(tmp_path / "narrativeqa.jsonl", line(), '{"input": "Who?", "context": ', line())
    with pytest.raises(BenchmarkDataError, match=rf"{file}:2: not valid JSON .*fix or delete this line"):
        load_longbench(tmp_path)


def test_line_that_is_not_an_object(tmp_path):
    file = write_jsonl(tmp_path / "narrativeqa.jsonl", "[1, 2]")
    with pytest.raises(BenchmarkDataError, match=rf"{file}:1: expected a JSON object, got a list"):
        load_longbench(file)


def test_blank_lines_are_skipped_and_line_numbers_still_count_them(tmp_path):
    file = write_jsonl(tmp_path / "narrativeqa.jsonl", line(), "", line(_id=...))
    with pytest.raises(BenchmarkDataError, match=rf"{file}:3: missing field '_id'; a record in the published format has"):
        load_longbench(file)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"answers": ...}, "missing field 'answers'"),
        ({"context": ...}, "missing field 'context'"),
        ({"answers": "Tom"}, "field 'answers' must be a list of strings"),
        ({"answers": [1]}, "field 'answers' must be a list of strings"),
        ({"input": None}, "field 'input' must be a string, got null"),
    ],
)
def test_bad_longbench_fields(tmp_path, changes, message):
    file = write_jsonl(tmp_path / "narrativeqa.jsonl", line(**changes))
    with pytest.raises(BenchmarkDataError, match=rf"{file}:1: {message}"):
        load_longbench(file)


def test_classification_task_needs_its_classes(tmp_path):
    file = write_jsonl(tmp_path / "trec.jsonl", line(all_classes=None))
    with pytest.raises(BenchmarkDataError, match=rf"{file}:1: field 'all_classes' must be a list of strings"):
        load_longbench(file)


@pytest.mark.parametrize(
    ("task", "record", "message"),
    [
        ("passkey", {"id": 0, "context": "c", "input": "q"}, "missing field 'answer'"),
        ("passkey", {"id": 0, "context": "c", "input": "q", "answer": [[1]]}, "field 'answer' must be a non-empty"),
        ("passkey", {"id": 0, "context": "c", "input": "q", "answer": []}, "field 'answer' must be a non-empty"),
        (
            "longbook_choice_eng",
            {"id": 0, "context": "c", "input": "q", "answer": ["E"], "options": ["A1", "B1", "C1", "D1"]},
            r"field 'answer' \('E'\) must be one of the options",
        ),
        (
            "code_debug",
            {"id": 0, "context": "c", "input": "", "answer": ["f"], "options": ["f", "g"]},
            "field 'options' must hold the four choices A-D, got 2",
        ),
        (
            "code_run",
            {"id": 0, "context": "c", "input": "What does func_2 return?", "answer": [1]},
            "a code_run input must name the call to evaluate",
        ),
        (
            "math_find",
            {"id": 0, "context": "[1]", "input": "Which is largest?", "answer": [1]},
            "a math_find input must say what to find",
        ),
    ],
)
def test_bad_infinitebench_records(tmp_path, task, record, message):
    file = write_jsonl(tmp_path / f"{task}.jsonl", json.dumps(record))
    with pytest.raises(BenchmarkDataError, match=rf"{file}:1: {message}"):
        load_infinitebench(file)


def test_bad_arguments():
    with pytest.raises(ValueError, match="limit must be a non-negative number"):
        load_longbench(LONGBENCH_DIR, limit=-1)
    with pytest.raises(ValueError, match=r"unknown InfiniteBench template set 'gpt4'; choose one of \['chat', "):
        load_infinitebench(INFINITEBENCH_DIR, template_set="gpt4")
