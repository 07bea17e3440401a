"""The bundled data: a training sample shaped like Belle and a held-out file that measures generalisation."""

import json
import re
import statistics
from collections import Counter

import pytest
from conftest import SAMPLE

from gemma_sft import REPO_ROOT

EVAL_FILE = REPO_ROOT / "data" / "belle_eval_zh.jsonl"
CATEGORIES = {"open_qa", "brainstorming", "generation", "rewrite", "classification", "closed_qa", "extraction",
              "summarization", "math", "code"}  # fmt: skip


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def answer_tokens(tokenizer, table):
    return [len(tokenizer(row["output"], add_special_tokens=False)["input_ids"]) for row in table]


def shingles(row, n=3):
    text = re.sub(r"\s+", "", row["instruction"] + row["input"])
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def skeleton(instruction):
    """An instruction with its numbers and quoted parts masked: rows made from one template share it."""
    return re.sub(r"“[^”]*”|\"[^\"]*\"|《[^》]*》|\d+(\.\d+)?", "#", instruction)


def test_both_files_are_belle_rows_with_a_known_category():
    for path in (SAMPLE, EVAL_FILE):
        for row in rows(path):
            assert set(row) == {"instruction", "input", "output", "category"}, path
            assert row["instruction"].strip() and row["output"].strip() and row["category"] in CATEGORIES


# Real Belle (the 806 answered rows of Belle's public evaluation set and seed tasks; aggregates only, character
# counts): answer median 139 and mean 214, prompt median 37; answers with a blank line 2%, with any line break 55%,
# with Markdown bold 0%, with a numbered list 22%, with -/• bullets 2%; mean share of ASCII characters 16%. Both
# bundled files must stay within these ranges, so that what the demo learns and what the reports measure is Belle's
# shape and voice, not ours.
BELLE_RANGES = {
    "answer_median": (110, 170),
    "answer_mean": (170, 260),
    "prompt_median": (25, 50),
    "blank_line": (0.0, 0.05),
    "any_break": (0.42, 0.68),
    "bold": (0.0, 0.0),
    "numbered": (0.15, 0.30),
    "bullets": (0.0, 0.05),
    "ascii": (0.10, 0.22),
}
NUMBERED = re.compile(r"(^|\n)\s*(\d+[.、)）]|[（(]\d+[)）]|第[一二三四五六七八九十]+[步点条])")
BULLET = re.compile(r"(^|\n)\s*[-•*·]\s")


def shape(table) -> dict:
    answers = [row["output"] for row in table]
    prompts = [row["instruction"] + ("\n" + row["input"] if row["input"] else "") for row in table]
    share = lambda test: sum(map(test, answers)) / len(answers)  # noqa: E731
    return {
        "answer_median": statistics.median(map(len, answers)),
        "answer_mean": statistics.fmean(map(len, answers)),
        "prompt_median": statistics.median(map(len, prompts)),
        "blank_line": share(lambda a: "\n\n" in a),
        "any_break": share(lambda a: "\n" in a),
        "bold": share(lambda a: "**" in a),
        "numbered": share(lambda a: bool(NUMBERED.search(a))),
        "bullets": share(lambda a: bool(BULLET.search(a))),
        "ascii": statistics.fmean(sum(c.isascii() for c in a) / len(a) for a in answers),
    }


@pytest.mark.parametrize("path", [SAMPLE, EVAL_FILE], ids=["training", "held-out"])
def test_each_file_has_real_belles_shape(path):
    figures = shape(rows(path))
    outside = {k: round(v, 3) for k, v in figures.items() if not BELLE_RANGES[k][0] <= v <= BELLE_RANGES[k][1]}
    assert not outside, f"{path.name} outside real Belle's ranges {BELLE_RANGES}: {outside}"


@pytest.mark.parametrize("path", [SAMPLE, EVAL_FILE], ids=["training", "held-out"])
def test_every_category_keeps_belles_voice(path):
    """Per category the lengths differ (code is long, classification short), the voice does not: no Markdown
    emphasis, almost never several paragraphs or bullets, no answer longer than Belle's long tail."""
    by_category = {}
    for row in rows(path):
        by_category.setdefault(row["category"], []).append(row)
    for name, table in by_category.items():
        figures = shape(table)
        assert figures["bold"] == 0 and figures["blank_line"] <= 0.1 and figures["bullets"] <= 0.1, name
        assert 15 <= figures["answer_median"] <= 400, (name, figures["answer_median"])
        assert max(len(row["output"]) for row in table) <= 900, name


def test_the_shape_check_catches_the_old_markdown_style():
    """The ranges above would fail on rows written as multi-paragraph Markdown (what these files used to hold)."""
    styled = [
        {"instruction": "介绍一下光合作用。", "input": "", "output": "**光合作用**\n\n1. 光反应\n\n- 暗反应" * 12}
    ] * 5
    figures = shape(styled)
    assert figures["bold"] > 0 and figures["blank_line"] > BELLE_RANGES["blank_line"][1]


def test_held_out_file_covers_every_category(tokenizer):
    held_out = rows(EVAL_FILE)
    assert len(held_out) >= 200
    counts = Counter(row["category"] for row in held_out)
    assert set(counts) == CATEGORIES and min(counts.values()) >= 15


def test_training_sample_spreads_like_belle(tokenizer):
    train = rows(SAMPLE)
    assert len(train) >= 450
    lengths = answer_tokens(tokenizer, train)
    assert min(lengths) < 20 and max(lengths) > 250  # a spread, as in Belle, not one length
    assert set(Counter(row["category"] for row in train)) == CATEGORIES
    shared = Counter(skeleton(row["instruction"]) for row in train)
    templated = sum(count for count in shared.values() if count > 1)
    assert templated <= 0.1 * len(train)


def test_no_held_out_row_is_a_near_duplicate_of_a_training_row():
    train = [shingles(row) for row in rows(SAMPLE)]
    for row in rows(EVAL_FILE):
        mine = shingles(row)
        closest = max(len(mine & other) / len(mine | other) for other in train)
        assert closest < 0.25, row["instruction"]
    instructions = [row["instruction"] for row in rows(SAMPLE) + rows(EVAL_FILE)]
    assert len(set(instructions)) == len(instructions)


@pytest.mark.parametrize("near", ["按时间顺序写出下面这段话里小刘周六下午都做了哪些事。"])
def test_the_near_duplicate_check_catches_a_reworded_task(near):
    """The check above would fail on a training row that asks for the same thing in other words."""
    eval_row = next(row for row in rows(EVAL_FILE) if "小刘周六下午" in row["instruction"])
    a, b = shingles(eval_row), shingles({"instruction": near, "input": eval_row["input"]})
    assert len(a & b) / len(a | b) >= 0.25
