"""The report breaks the held-out loss down by category and says plainly when the adapter made things worse."""

import json
import shutil

import pytest
import torch
from conftest import belle_rows, write_jsonl

from gemma_sft import data, inference
from gemma_sft.inference import report as report_module
from gemma_sft.models import load_for_inference


def conversations_with_categories():
    rows = belle_rows(6)
    messages = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
                for r in rows]  # fmt: skip
    return messages, ["math", "math", "math", "code", "code", "code"]


def spoiled(adapter_dir, tmp_path, noise):
    """A copy of the tiny adapter, its LoRA B matrices random with standard deviation `noise` (0: the base model
    itself; None: as trained)."""
    copy = tmp_path / f"adapter-{noise}"
    shutil.copytree(adapter_dir, copy)
    model, tokenizer, _ = load_for_inference(copy)
    if noise is not None:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, noise) if noise else parameter.zero_()
    return model, tokenizer, copy


def test_a_worse_adapter_is_reported_overall_and_per_category(tiny_adapter, tmp_path, monkeypatch):
    """A random tiny model is near-uniform with or without an adapter, so the losses are given here: the base's
    first, then the adapter's, worse on both categories (answer_loss itself is checked in test_tools)."""
    model, tokenizer, folder = spoiled(tiny_adapter, tmp_path, None)
    messages, categories = conversations_with_categories()
    per_row = iter([[(3.0, 3)] * 6, [(4.5, 3)] * 3 + [(3.3, 3)] * 3])  # base 1.0 per token; adapter 1.5 and 1.1

    def given_losses(model, tokenizer, conversations, max_positions=1024):
        rows = next(per_row)
        loss = sum(r for r, _ in rows) / sum(t for _, t in rows)
        return {"loss": loss, "perplexity": 1.0, "tokens": 18, "rows": len(rows), "per_row": rows}

    monkeypatch.setattr(report_module, "answer_loss", given_losses)
    result = inference.compare(model, tokenizer, messages, folder, num_prompts=0, categories=categories)
    report = (folder / "report.md").read_text()
    assert "**Warning: the adapter is worse than the base model on the held-out rows (1.0000 -> 1.3000)" in report
    assert "on 2 categories: code (1.0000 -> 1.1000), math (1.0000 -> 1.5000)" in report
    assert "What to try: try a lower learning_rate" in report
    assert "| math | 3 | 1.0000 | 1.5000 | +50.0% |" in report and "| code | 3 | 1.0000 | 1.1000 | +10.0% |" in report
    assert "WARNING: the adapter is worse than the base model" in result["summary"]
    saved = json.loads((folder / "eval_report.json").read_text())
    assert set(saved["categories"]) == {"math", "code"} and len(saved["warnings"]) == 2


def test_an_adapter_that_changes_nothing_gets_no_warning(tiny_adapter, tmp_path):
    model, tokenizer, folder = spoiled(tiny_adapter, tmp_path, 0.0)
    messages, categories = conversations_with_categories()
    result = inference.compare(model, tokenizer, messages, folder, num_prompts=0, categories=categories)
    assert result["adapter"]["loss"] == pytest.approx(result["base"]["loss"], rel=1e-6)
    assert result["warnings"] == [] and "Warning" not in (folder / "report.md").read_text()


def test_per_category_loss_pools_the_categorys_tokens():
    result = {"per_row": [(6.0, 3), (2.0, 1), (9.0, 3)]}
    assert inference.by_category(result, ["a", "a", None]) == {"a": 2.0}
    base, tuned = {"loss": 2.0}, {"loss": 1.9}
    assert inference.warnings_for(base, tuned, {"a": 2.0, "b": 1.0}, {"a": 1.5, "b": 1.2}) == [
        "the adapter is worse than the base model on 1 category: b (1.0000 -> 1.2000)"
    ]


def test_held_out_rows_from_a_separate_file_carry_their_categories(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", belle_rows(12))
    held_out = write_jsonl(
        tmp_path / "eval.jsonl",
        [{**row, "category": "math" if i % 2 else "code"} for i, row in enumerate(belle_rows(8, offset=50))],
    )
    settings = {"dataset_name": str(train), "dataset_config": None, "dataset_train_split": "train", "max_samples": 0,
                "eval_samples": 5, "max_length": 256, "seed": 3, "system_prompt": None, "drop_overlong": True,
                "eval_dataset_name": str(held_out)}  # fmt: skip
    prepared = data.prepare_from_settings(settings, tokenizer)
    assert len(prepared.train) == 12 and len(prepared.eval) == 5  # nothing split off the training rows
    held_out_questions = {row["instruction"] for row in belle_rows(8, offset=50)}
    assert {m[0]["content"] for m in prepared.eval_messages} <= held_out_questions
    assert sorted(set(prepared.eval_categories)) == ["code", "math"]
    again = data.prepare_from_settings(settings, tokenizer)
    assert again.eval_messages == prepared.eval_messages  # the same rows for the same seed: evaluate.py redraws them


def test_a_category_that_is_not_a_string_names_its_line(tokenizer, tmp_path):
    from gemma_sft import UserError

    bad = write_jsonl(tmp_path / "bad.jsonl", [{**belle_rows(1)[0], "category": 3}])
    with pytest.raises(UserError, match=r"bad\.jsonl:1: field 'category' must be a string, got int"):
        data.prepare(data.load_conversations(str(bad)), tokenizer, max_samples=0, eval_samples=0, max_length=None,
                     seed=0)  # fmt: skip
