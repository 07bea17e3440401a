"""Nothing lost: a killed run resumes to the same adapter, and hostile data never escapes as a traceback."""

import json
import signal
import string
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, TINY_RECIPE_FLAGS, belle_rows, write_jsonl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from gemma_sft import UserError, data, outputs

pytestmark = pytest.mark.train  # every test here trains a model or uses a trained one


DEMO = "recipes/gemma3_270m_belle_demo.yaml"


def _train(model, rows, out) -> subprocess.CompletedProcess:
    return subprocess.run(_train_command(model, rows, out), cwd=REPO_ROOT, capture_output=True, text=True)


def _train_command(model, rows, out):
    flags = list(TINY_RECIPE_FLAGS)
    flags[flags.index("--save_strategy") + 1] = "steps"
    flags[flags.index("--max_length") + 1] = "96"
    return [sys.executable, "sft.py", DEMO, "--model_path", str(model), "--data_path", str(rows), "--output_dir",
            str(out), *flags, "--save_steps", "3", "--save_total_limit", "2", "--num_train_epochs", "3",
            "--eval_report", "false"]  # fmt: skip


def test_a_killed_run_resumes_to_the_same_adapter_as_an_uninterrupted_one(tmp_path, tiny_model_dir):
    from sft import main as sft_main

    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(16))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert sft_main(_train_command(tiny_model_dir, rows, straight)[2:]) == 0  # uninterrupted, in this process
    total_steps = json.loads((straight / "trainer_state.json").read_text())["global_step"]
    assert total_steps >= 9

    victim = subprocess.Popen(_train_command(tiny_model_dir, rows, resumed), cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while outputs.last_complete_checkpoint(resumed) is None and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    interrupted_at = outputs.last_complete_checkpoint(resumed)
    assert interrupted_at is not None and not (resumed / "adapter_config.json").exists()
    assert int(interrupted_at.rsplit("-", 1)[1]) < total_steps

    again = subprocess.run(
        _train_command(tiny_model_dir, rows, resumed), cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Resuming from {interrupted_at}" in again.stdout
    expected = load_file(straight / "adapter_model.safetensors")
    actual = load_file(resumed / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4)


def test_partial_checkpoints_are_skipped_when_resuming(tmp_path):
    good, partial = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    for folder in (good, partial):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    (good / "trainer_state.json").write_text("{}")
    (partial / "trainer_state.json").write_text('{"global_st')  # killed while writing
    assert outputs.last_complete_checkpoint(tmp_path) == str(good)
    assert outputs.check_output_dir(str(tmp_path), overwrite=False) == str(good)


def test_fsdp_checkpoints_are_found_when_resuming(tmp_path):
    """FSDP checkpoints hold the model state in FSDP's own format, not adapter_model.safetensors."""
    sharded, sharded_partial, gathered = tmp_path / "checkpoint-10", tmp_path / "checkpoint-20", tmp_path / "other"
    (sharded / "pytorch_model_fsdp_0").mkdir(parents=True)
    (sharded / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x")
    (sharded_partial / "pytorch_model_fsdp_0").mkdir(parents=True)  # shards written, .metadata not yet
    (sharded_partial / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    for folder in (sharded, sharded_partial):
        (folder / "trainer_state.json").write_text("{}")
    assert outputs.last_complete_checkpoint(tmp_path) == str(sharded)

    (gathered / "checkpoint-30").mkdir(parents=True)
    (gathered / "checkpoint-30" / "pytorch_model_fsdp_0.bin").write_bytes(b"x")
    (gathered / "checkpoint-30" / "trainer_state.json").write_text("{}")
    assert outputs.last_complete_checkpoint(gathered) == str(gathered / "checkpoint-30")


def test_fp16_is_refused_with_a_pointer_to_bf16():
    from sft import main as sft_main

    with pytest.raises(UserError, match=r"fp16 overflows Gemma 3.*bf16"):
        sft_main([DEMO, "--fp16", "true", "--use_cpu", "true", "--dry_run"])


# -----------------------------------------------------------------------------------------------------------
# Hostile data: random JSON shapes, unicode, control characters, BOMs, CRLF, invalid bytes, huge strings
# -----------------------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12,
)
field_names = st.sampled_from(["instruction", "input", "output", "text", "prompt", "completion", "messages", "role"])
rows = st.dictionaries(field_names, json_values | st.text(), max_size=5) | json_values
nasty_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=200) | st.sampled_from(
    ["\x00\x01\x1b[31m", "\u202e反转", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀", "### 回答:", "a" * 20000, "\r\n", "\ufeff"]
)


def _load_and_prepare(path, tokenizer):
    rows = data.load_conversations(str(path))
    return data.prepare(rows, tokenizer, max_samples=0, eval_samples=0, max_length=64, seed=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(rows, min_size=1, max_size=6), bom=st.booleans(), crlf=st.booleans())
@example(lines=[{"instruction": {"\x00": {}}}], bom=False, crlf=False)  # Arrow reads it, datasets cannot give it back
def test_random_json_rows_give_a_clear_error_or_counted_skips(tmp_path, tokenizer, lines, bom, crlf):
    text = "\n".join(json.dumps(line, ensure_ascii=False) for line in lines)
    text = ("\ufeff" if bom else "") + (text.replace("\n", "\r\n") if crlf else text)
    path = tmp_path / "hostile.jsonl"
    path.write_text(text, encoding="utf-8")
    try:
        prepared = _load_and_prepare(path, tokenizer)
    except UserError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message
        return
    counted = len(prepared.train) + sum(prepared.skipped.values())
    assert counted == prepared.rows_read == len(lines)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instruction=nasty_text, extra=nasty_text, answer=nasty_text)
def test_any_text_in_belle_rows_is_kept_or_skipped_never_crashes(tmp_path, tokenizer, instruction, extra, answer):
    path = write_jsonl(tmp_path / "text.jsonl", [{"instruction": instruction, "input": extra, "output": answer}])
    try:
        prepared = _load_and_prepare(path, tokenizer)
    except UserError as error:
        assert "only 0 usable rows" in str(error)  # everything skipped, and said so
        return
    row = prepared.train[0]
    assert row["input_ids"][0] == tokenizer.bos_token_id and sum(row["assistant_masks"]) >= 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl"]))
def test_arbitrary_bytes_never_escape_as_a_traceback(tmp_path, tokenizer, blob, suffix):
    path = tmp_path / f"bytes{suffix}"
    path.write_bytes(blob)
    try:
        _load_and_prepare(path, tokenizer)
    except UserError as error:
        assert str(path) in str(error) and "\n" not in str(error)


def test_printable_garbage_lines_report_their_line_number(tmp_path, tokenizer):
    path = tmp_path / "garbage.jsonl"
    path.write_text(json.dumps(belle_rows(1)[0]) + "\n" + string.punctuation + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"garbage\.jsonl:2: invalid JSON"):
        _load_and_prepare(path, tokenizer)


class _FakeTrainer:
    """Just enough of a Trainer for save_adapter: writes an adapter like PEFT does, or fails like a full disk."""

    def __init__(self, fail_on=None):
        self.fail_on = fail_on
        self.processing_class = self

    def is_world_process_zero(self):
        return True

    def save_model(self, folder):
        from pathlib import Path

        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"new weights")
        if self.fail_on == "save_model":
            raise OSError(28, "No space left on device")
        (Path(folder) / "adapter_config.json").write_text("{}")

    def save_pretrained(self, folder):
        pass


def test_a_full_disk_during_the_final_save_is_a_clear_error_and_no_complete_looking_adapter(tmp_path):
    with pytest.raises(UserError, match="could not write the adapter \\(No space left on device\\)"):
        outputs.save_adapter(_FakeTrainer(fail_on="save_model"), str(tmp_path), {"seed": 1})
    assert not (tmp_path / "adapter_config.json").exists()


def test_a_crash_while_moving_the_adapter_in_leaves_no_config(tmp_path, monkeypatch):
    (tmp_path / "adapter_config.json").write_text('{"old": true}')  # an earlier adapter being replaced
    real_replace = outputs.os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", crash_on_second)
    with pytest.raises(UserError, match="could not write the adapter"):
        outputs.save_adapter(_FakeTrainer(), str(tmp_path), {"seed": 1})
    assert not (tmp_path / "adapter_config.json").exists()  # old config removed first, new one never moved in
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    outputs.save_adapter(_FakeTrainer(), str(tmp_path), {"seed": 1})
    assert (tmp_path / "adapter_config.json").read_text() == "{}"
    assert (tmp_path / "recipe.yaml").read_text().endswith("seed: 1\n")


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    import torch
    from trl import ModelConfig, SFTConfig

    from gemma_sft import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla T4")
    args = SFTConfig(output_dir="unused", bf16=False, use_cpu=True)
    with pytest.raises(UserError, match="bf16 is not supported by Tesla T4"):
        hardware.check_precision(args, ModelConfig(dtype="bfloat16"))


OUT_OF_MEMORY_RUN = """
import runpy, sys, torch
from gemma_sft import models

def load_model(*args, **kwargs):
    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.6 GiB\\n"
        "Of the allocated memory 13.9 GiB is allocated by PyTorch."
    )

models.load_model = load_model
sys.argv = ["sft.py", *sys.argv[1:]]
runpy.run_path("sft.py", run_name="__main__")
"""


def test_running_out_of_gpu_memory_says_what_to_change_in_one_line(tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(12))
    out = tmp_path / "out"
    command = _train_command(tiny_model_dir, rows, out)
    result = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_RUN, *command[2:]], cwd=REPO_ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has")
    assert "recipes/gemma3_belle_low_memory.yaml" in line and "--gradient_accumulation_steps" in line
    assert "Traceback" not in result.stderr
    assert not (out / "adapter_model.safetensors").exists()
