"""evaluate.py, chat.py and merge.py on a tiny trained adapter."""

import json

import pytest
import torch
from conftest import belle_rows, run_script, write_jsonl

from gemma_sft import UserError
from gemma_sft.modeling import load_for_inference

PROMPT = "<bos><start_of_turn>user\n计算 4 加 9 等于多少？<end_of_turn>\n<start_of_turn>model\n"


def test_training_writes_a_report_whose_loss_matches_the_trainer(tiny_adapter):
    report = json.loads((tiny_adapter / "eval_report.json").read_text())
    trainer_eval = json.loads((tiny_adapter / "eval_results.json").read_text())["eval_loss"]
    assert report["adapter"]["rows"] == 6
    # our pooled answer-token loss and TRL's evaluation loss are the same quantity, computed independently
    assert report["adapter"]["loss"] == pytest.approx(trainer_eval, rel=1e-3)
    assert report["adapter"]["loss"] < report["base"]["loss"]
    text = (tiny_adapter / "report.md").read_text()
    assert "| base + adapter |" in text and "## Greedy generations" in text and "loss_curve.png" in text
    assert (tiny_adapter / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_redraws_the_held_out_rows_or_reads_a_file(tiny_adapter, tmp_path, capsys):
    from evaluate import main as evaluate_main

    before = json.loads((tiny_adapter / "eval_report.json").read_text())
    assert evaluate_main(["--adapter", str(tiny_adapter), "--num_prompts", "2", "--max_new_tokens", "8"]) == 0
    again = json.loads((tiny_adapter / "eval_report.json").read_text())
    assert again["adapter"]["loss"] == pytest.approx(before["adapter"]["loss"], rel=1e-5)  # same rows, same model
    assert "Held-out answer loss: base" in capsys.readouterr().out

    other = write_jsonl(tmp_path / "other.jsonl", belle_rows(3, offset=100))
    assert evaluate_main(["--adapter", str(tiny_adapter), "--data", str(other), "--num_prompts", "0"]) == 0
    assert json.loads((tiny_adapter / "eval_report.json").read_text())["adapter"]["rows"] == 3


def test_tools_refuse_a_folder_without_an_adapter(tmp_path):
    from evaluate import main as evaluate_main

    with pytest.raises(UserError, match="no finished adapter here"):
        evaluate_main(["--adapter", str(tmp_path)])


def test_chat_one_shot_and_interactive(tiny_adapter):
    one_shot = run_script("chat.py", "--adapter", tiny_adapter, "--prompt", "计算 4 加 9 等于多少？",
                          "--max_new_tokens", "6")  # fmt: skip
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout.strip()
    session = run_script("chat.py", "--adapter", tiny_adapter, "--max_new_tokens", "4",
                         input_text="你好\n/base\n再说一遍\n/reset\n/exit\n")  # fmt: skip
    assert session.returncode == 0, session.stderr
    assert "[now: base]" in session.stdout and "[conversation cleared]" in session.stdout
    assert session.stdout.count("模型> ") == 2


def test_inference_loading_stops_at_end_of_turn(tiny_adapter):
    model, tokenizer, _ = load_for_inference(tiny_adapter)
    assert 106 in model.generation_config.eos_token_id
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("<start_of_turn>model\n")  # fmt: skip


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 0.1)])
def test_merged_model_matches_the_adapter(tiny_adapter, tmp_path, dtype, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge import main as merge_main

    out = tmp_path / "merged"
    assert merge_main(["--adapter", str(tiny_adapter), "--output", str(out), "--dtype", dtype]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "generation" in tokenizer.chat_template and 106 in merged.generation_config.eos_token_id
    assert not any("lora" in name for name, _ in merged.named_parameters())

    adapted, _, _ = load_for_inference(tiny_adapter)
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, actual = adapted(ids).logits, merged(ids).logits
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=0)
    with pytest.raises(UserError, match="already exists"):
        merge_main(["--adapter", str(tiny_adapter), "--output", str(out)])
