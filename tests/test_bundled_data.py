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


def test_held_out_file_covers_every_category_with_long_form_answers(tokenizer):
    held_out = rows(EVAL_FILE)
    assert len(held_out) >= 200
    counts = Counter(row["category"] for row in held_out)
    assert set(counts) == CATEGORIES and min(counts.values()) >= 15
    assert 150 <= statistics.fmean(answer_tokens(tokenizer, held_out)) <= 300


def test_training_sample_is_shaped_like_belle(tokenizer):
    train = rows(SAMPLE)
    assert len(train) >= 600
    lengths = answer_tokens(tokenizer, train)
    assert 150 <= statistics.fmean(lengths) <= 300  # real Belle answers average ~230 tokens
    assert min(lengths) < 40 and max(lengths) > 450  # a spread, as in Belle, not one length
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


@pytest.mark.parametrize("near", ["请提取这份体检报告摘要中所有异常的指标，并注明参考范围。"])
def test_the_near_duplicate_check_catches_a_reworded_task(near):
    """The check above would fail on a training row that asks for the same thing in other words."""
    eval_row = next(row for row in rows(EVAL_FILE) if "体检报告" in row["instruction"])
    a, b = shingles(eval_row), shingles({"instruction": near, "input": eval_row["input"]})
    assert len(a & b) / len(a | b) >= 0.25
