"""evaluate.py, chat.py and merge.py on a tiny trained adapter."""

import json

import pytest
import torch
from conftest import belle_rows, run_script, write_jsonl

from gemma_sft import UserError
from gemma_sft.models import load_for_inference

pytestmark = pytest.mark.train  # every test here trains a model or uses a trained one

PROMPT = "<bos><start_of_turn>user\n计算 4 加 9 等于多少？<end_of_turn>\n<start_of_turn>model\n"


def test_training_writes_a_report_whose_loss_matches_the_trainer(tiny_adapter):
    report = json.loads((tiny_adapter / "eval_report.json").read_text())
    history = json.loads((tiny_adapter / "trainer_state.json").read_text())["log_history"]
    trainer_eval = [h["eval_loss"] for h in history if "eval_loss" in h][-1]  # TRL's, after the last epoch
    assert report["adapter"]["rows"] == 6
    # our pooled answer-token loss and TRL's evaluation loss are the same quantity, computed independently
    assert report["adapter"]["loss"] == pytest.approx(trainer_eval, rel=1e-3)
    saved = json.loads((tiny_adapter / "eval_results.json").read_text())  # the report's figures, not a third pass
    assert saved["eval_loss"] == report["adapter"]["loss"] and saved["eval_base_loss"] == report["base"]["loss"]
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


def test_chat_one_shot_and_interactive(tiny_adapter, capsys):
    from chat import main as chat_main

    # the one-shot answer in this process (its tokenizer is read already); the session below runs chat.py itself
    one_shot = ["--adapter", str(tiny_adapter), "--prompt", "计算 4 加 9 等于多少？", "--max_new_tokens", "6"]
    assert chat_main(one_shot) == 0
    assert capsys.readouterr().out.strip()
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


def test_answer_loss_projects_only_answer_positions_and_matches_full_logits(tiny_model_dir):
    """The report's loss runs the output head on the supervised positions only, in chunks; it must equal the mean
    cross-entropy over those tokens computed from the full logits."""
    from transformers import AutoModelForCausalLM

    from gemma_sft.data import tokenize
    from gemma_sft.inference import answer_loss
    from gemma_sft.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir), "chat_templates/gemma3.jinja")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    conversations = [
        [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        for r in belle_rows(3)
    ]
    conversations.append([*conversations[0], {"role": "user", "content": "再算一次"}, *conversations[1][1:]])

    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            encoded = tokenize(tokenizer, messages)
            ids = torch.tensor([encoded["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            mask = torch.tensor(encoded["assistant_masks"][1:], dtype=torch.bool)
            total += torch.nn.functional.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum").item()
            count += int(mask.sum())

    whole = answer_loss(model, tokenizer, conversations)
    chunked = answer_loss(model, tokenizer, conversations, max_positions=3)
    assert whole["tokens"] == chunked["tokens"] == count and whole["rows"] == 4
    assert whole["loss"] == pytest.approx(total / count, rel=1e-5)
    assert chunked["loss"] == pytest.approx(total / count, rel=1e-5)


def test_report_and_inference_read_rows_without_flex_attention(tiny_adapter, tmp_path, monkeypatch):
    """flex_attention serves packed training rows of one length; each held-out row or generation step has a new
    length, which a GPU cannot compile flex for. The report and the inference loader use sdpa, and training's
    flex_attention is back once the report is written."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_utils import AttentionInterface

    from gemma_sft.inference import compare

    flex_recipe = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, flex_recipe)
    recipe = (flex_recipe / "recipe.yaml").read_text()
    (flex_recipe / "recipe.yaml").write_text(f"{recipe}\nattn_implementation: flex_attention\n")
    loaded, _, recipe_seen = load_for_inference(flex_recipe)
    assert recipe_seen["attn_implementation"] == "flex_attention"
    assert loaded.get_base_model().config._attn_implementation == "sdpa"

    def no_flex(*args, **kwargs):
        raise AssertionError("flex_attention ran on an unpacked row")

    base_path = json.loads((tiny_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    trained = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch.float32, attn_implementation="flex_attention"
    )
    trained = PeftModel.from_pretrained(trained, str(tiny_adapter))
    monkeypatch.setitem(AttentionInterface._global_mapping, "flex_attention", no_flex)
    conversations = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
                     for r in belle_rows(2)]  # fmt: skip
    result = compare(trained, AutoTokenizer.from_pretrained(tiny_adapter), conversations, flex_recipe, 1, 4)
    assert result["adapter"]["rows"] == 2 and (flex_recipe / "report.md").is_file()
    assert trained.get_base_model().config._attn_implementation == "flex_attention"
    with pytest.raises(AssertionError, match="flex_attention ran"), torch.no_grad():  # the check would catch flex
        trained(input_ids=torch.tensor([[2, 105, 2364]]), use_cache=False)
