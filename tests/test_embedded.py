"""The embedded Gemma 3 270M: conversion from the GGUF package, and the CPU demo recipe end to end (slow)."""

import json

import pytest
import torch

from gemma_sft.models import embedded, load_tokenizer

pytestmark = pytest.mark.slow


def test_conversion_gives_a_working_hugging_face_folder():
    from transformers import AutoModelForCausalLM

    folder = embedded.model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["vocab_size"] == 262144
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert 106 in model.generation_config.eos_token_id
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id and ids.shape[1] < 25  # real merges: ~1 token per word
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 3.5  # a matching tokenizer and weights predict plain English well; a mismatch scores ~10+


def test_demo_recipe_trains_an_adapter_that_beats_the_base_on_held_out_rows(tmp_path):
    """Held-out rows from data/belle_eval_zh.jsonl: other topics than any training row, Belle-length answers."""
    from sft import main as sft_main

    out = tmp_path / "demo"
    args = ["recipes/gemma3_270m_belle_demo.yaml", "--output_dir", str(out), "--max_samples", "8",
            "--eval_samples", "8", "--max_length", "512", "--save_strategy", "no", "--report_prompts", "1",
            "--report_max_new_tokens", "8"]  # fmt: skip
    assert sft_main(args) == 0
    report = json.loads((out / "eval_report.json").read_text())
    assert report["adapter"]["rows"] == 8 and report["adapter"]["tokens"] > 8 * 100
    assert report["adapter"]["loss"] < report["base"]["loss"]
    generations = (out / "report.md").read_text().split("## Greedy generations")[1]
    assert len([line for line in generations.splitlines() if line.startswith("| ")]) == 2  # header + one prompt
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard logs, the recipe's default
