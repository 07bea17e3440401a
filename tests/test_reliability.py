"""Nothing silently wrong (issue 32): a data cache that checks itself, one run per output folder, a resume that is
honest, no evaluation nobody asked for, and one-line errors for values that cannot work. Each test reproduces a case
the old code got wrong."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, TINY_RECIPE_FLAGS, belle_rows, write_jsonl
from safetensors.torch import load_file

from gemma_sft import UserError, config, data, outputs, resume
from gemma_sft.data import cache as data_cache
from gemma_sft.publish import publish_dir, remove_stale
from sft import main as sft_main

DEMO = "recipes/gemma3_270m_belle_demo.yaml"


def _tiny_run(model, rows, out, *extra):
    return [DEMO, "--model_path", str(model), "--data_path", str(rows), "--output_dir", str(out), *TINY_RECIPE_FLAGS,
            "--eval_report", "false", "--lora_dropout", "0", *extra]  # fmt: skip


# -----------------------------------------------------------------------------------------------------------------
# 1. The data cache checks what it hands out
# -----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GEMMA_SFT_DATA_CACHE", str(folder))
    monkeypatch.setattr(data_cache, "_SWEPT", set())
    return folder


def _prepare(path, tokenizer):
    conversations = data.load_conversations(str(path))
    prepared = data.prepare(conversations, tokenizer, max_samples=0, eval_samples=0, max_length=256, seed=0)
    return [list(row) for row in prepared.train["input_ids"]]


def _overwrite_middle(path: Path):
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = b"\x7f" * 64  # what the issue did: 64 bytes inside the table
    path.write_bytes(bytes(raw))


DAMAGE = {
    "overwritten": ("tokens", lambda entry: _overwrite_middle(next((entry / "rows").glob("*.arrow")))),
    "truncated": ("tokens", lambda entry: os.truncate(next((entry / "rows").glob("*.arrow")), 1000)),
    "meta.json missing": ("conversations", lambda entry: (entry / "meta.json").unlink()),
    "state.json broken": ("conversations", lambda entry: (entry / "rows" / "state.json").write_text('{"_data_fil')),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_entry_is_rebuilt_with_one_line_never_trusted(tmp_path, tokenizer, own_cache, capfd, damage):
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(12))
    expected = _prepare(rows, tokenizer)
    kind, harm = DAMAGE[damage]
    (entry,) = [path for path in (own_cache / kind).iterdir() if path.is_dir()]
    harm(entry)
    capfd.readouterr()
    assert _prepare(rows, tokenizer) == expected  # the old code trained on changed ids, or raised
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("data cache:")]
    assert len(lines) == 1 and str(entry) in lines[0] and lines[0].endswith("rebuilding it"), lines
    assert data_cache.check_entry(entry) is None  # whole again: the next read says nothing
    assert _prepare(rows, tokenizer) == expected
    assert "data cache:" not in capfd.readouterr().err


def test_checking_the_cache_costs_little_next_to_tokenizing(tmp_path, tokenizer, own_cache):
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(2000))
    started = time.perf_counter()
    _prepare(rows, tokenizer)
    building = time.perf_counter() - started
    entries = [path for kind in ("conversations", "tokens") for path in (own_cache / kind).iterdir() if path.is_dir()]
    started = time.perf_counter()
    assert all(data_cache.check_entry(entry) is None for entry in entries)
    checking = time.perf_counter() - started
    assert checking < 0.05 * building, (checking, building)


KILLED_BUILDER = """
import sys, time
from gemma_sft.data import cache

def build(scratch):
    (scratch / "half.arrow").write_bytes(b"x" * 1000)
    print("building", flush=True)
    time.sleep(600)

cache.cached("tokens", sys.argv[1], build)
"""


def test_folders_left_by_a_killed_preparation_are_removed(tmp_path, own_cache, tokenizer):
    env = {**os.environ, "GEMMA_SFT_DATA_CACHE": str(own_cache)}
    victim = subprocess.Popen([sys.executable, "-c", KILLED_BUILDER, "abc"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert victim.stdout.readline().strip() == "building"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    folder = own_cache / "tokens"
    left = sorted(path.name.split("-")[0] for path in folder.iterdir() if path.is_dir())
    assert left == [".abc.partial", ".abc.scratch"]  # what kill -9 leaves behind
    alive = folder / f".def.partial-{os.getpid()}-x"  # a builder still at work (this process) is left alone
    alive.mkdir()
    _prepare(write_jsonl(tmp_path / "rows.jsonl", belle_rows(4)), tokenizer)  # any later preparation cleans up
    assert sorted(path.name for path in folder.iterdir() if path.name.startswith(".") and path.is_dir()) == [
        alive.name
    ]
    assert remove_stale(folder) == []


# -----------------------------------------------------------------------------------------------------------------
# 2. One run per output folder
# -----------------------------------------------------------------------------------------------------------------
@pytest.mark.train
def test_a_second_run_on_the_same_output_folder_is_refused_naming_the_first(tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(12))
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "sft.py", *_tiny_run(tiny_model_dir, rows, out, "--max_steps", "3")],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lock = tmp_path / ".out.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().strip()) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(UserError, match=rf"out: another run \(pid {first.pid}\) is using this output folder"):
        sft_main(_tiny_run(tiny_model_dir, rows, out, "--max_steps", "3"))
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not lock.exists()  # released and removed: the next run takes it
    with outputs.run_lock(str(out)):
        pass


HOLD_LOCK = """
import sys, time
from gemma_sft import outputs

with outputs.run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError) as refused, outputs.run_lock(str(out)):
        pass
    assert f"(pid {holder.pid})" in str(refused.value) and "\n" not in str(refused.value)
    assert not out.exists()  # taking the lock writes nothing into the folder
    holder.send_signal(signal.SIGKILL)  # kill -9 leaves no stale lock
    holder.wait()
    with outputs.run_lock(str(out)):
        pass


def test_publishing_never_deletes_what_another_process_published(tmp_path):
    target = tmp_path / "merged"

    def build(folder):
        (folder / "model.bin").write_text("mine")
        publish_dir(lambda other: (other / "model.bin").write_text("theirs"), target)  # another process, meanwhile

    with pytest.raises(UserError, match="another process wrote it while this one was building"):
        publish_dir(build, target, replace=True)  # merge.py and export.py replace what was there when they began
    assert (target / "model.bin").read_text() == "theirs"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


# -----------------------------------------------------------------------------------------------------------------
# 3 and 4. A resume keeps the run's settings and ends at exactly its last step, with the uninterrupted adapter
# -----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, tiny_model_dir):
    """Uninterrupted runs keeping a checkpoint per step: by max_steps (2 of an epoch's 10 unpacked rows) and by
    epochs (1: its packed rows)."""
    folder = tmp_path_factory.mktemp("straight")
    rows = write_jsonl(folder / "rows.jsonl", belle_rows(12))
    runs = {}
    lengths = {"max_steps": ["--max_steps", "2", "--packing", "false"], "epochs": ["--num_train_epochs", "1"]}
    for name, length in lengths.items():
        out = folder / name
        assert sft_main(_tiny_run(tiny_model_dir, rows, out, *length, "--save_strategy", "steps", "--save_steps", "1",
                                  "--save_total_limit", "5")) == 0  # fmt: skip
        runs[name] = (out, length)
    return rows, runs


def _interrupted_after(straight: Path, step: int, out: Path) -> Path:
    """The folder a kill -9 right after checkpoint-`step` leaves: the recipe it started with and its checkpoints."""
    out.mkdir()
    shutil.copy(straight / resume.START_RECIPE, out)
    for checkpoint in straight.glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) <= step:
            shutil.copytree(checkpoint, out / checkpoint.name)
    return out


def _assert_same_adapter(actual: Path, expected: Path):
    want, got = load_file(expected / "adapter_model.safetensors"), load_file(actual / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def _state(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())


@pytest.mark.train
def test_a_resume_with_a_changed_learning_rate_is_refused_unless_meant(tmp_path, tiny_model_dir, straight_runs):
    rows, runs = straight_runs
    straight, length = runs["max_steps"]
    out = _interrupted_after(straight, 1, tmp_path / "out")
    with pytest.raises(UserError) as refused:
        sft_main([*_tiny_run(tiny_model_dir, rows, out, *length), "--learning_rate", "5e-6"])
    message = str(refused.value)
    assert "learning_rate 0.005 -> 5e-06" in message and "checkpoint-1" in message and "\n" not in message
    assert "--resume_with_changed_settings true" in message
    assert not (out / "checkpoint-2").exists()  # refused before anything ran
    # logging, saving and speed settings may change; what the checkpoint carries may not
    unchanged = recipe_for(tiny_model_dir, rows, out, *length, "--logging_steps", "5", "--fused_output_head", "false")
    assert resume.changed_settings(unchanged, yaml.safe_load((out / resume.START_RECIPE).read_text())) == []

    assert sft_main([*_tiny_run(tiny_model_dir, rows, out, *length), "--learning_rate", "5e-6",
                     "--resume_with_changed_settings", "true"]) == 0  # fmt: skip
    saved = (out / "recipe.yaml").read_text()
    assert "# Resumed from checkpoint-1 with settings changed since the run started: learning_rate" in saved


def recipe_for(model, rows, out, *extra):
    return config.parse(_tiny_run(model, rows, out, *extra))


@pytest.mark.train
def test_a_run_started_before_recipes_were_recorded_resumes_and_says_so(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    recipe = recipe_for(tiny_model_dir, tmp_path / "rows.jsonl", out, "--learning_rate", "1e-4")
    assert resume.check_settings(recipe, str(out / "checkpoint-3")) == ""
    assert f"no readable {resume.START_RECIPE}" in capsys.readouterr().out


@pytest.mark.train
@pytest.mark.parametrize(
    ("length", "at"),
    # the cases: a step past max_steps, and "train_loss": 0.0 for a run that had all its epochs
    [("max_steps", "mid-run"), ("max_steps", "last step"), ("epochs", "last step")],
)
def test_a_resumed_run_ends_at_its_last_step_with_the_uninterrupted_adapter(
    tmp_path, tiny_model_dir, straight_runs, capsys, length, at
):
    rows, runs = straight_runs
    straight, flags = runs[length]
    steps = _state(straight)["global_step"]
    assert steps >= 2
    out = _interrupted_after(straight, steps - 1 if at == "mid-run" else steps, tmp_path / "out")
    assert sft_main(_tiny_run(tiny_model_dir, rows, out, *flags)) == 0
    if at == "last step":
        assert f"holds all {steps} steps" in capsys.readouterr().out
    assert _state(out)["global_step"] == steps  # the old code trained a step past max_steps
    _assert_same_adapter(out, straight)
    expected = json.loads((straight / "train_results.json").read_text())["train_loss"]
    loss = json.loads((out / "train_results.json").read_text())["train_loss"]
    assert loss == pytest.approx(expected, rel=1e-4)  # the whole run's, not 0.0 or this session's share


# -----------------------------------------------------------------------------------------------------------------
# 5. eval_report false means no evaluation after training, unless eval_strategy asks
# -----------------------------------------------------------------------------------------------------------------
@pytest.mark.train
@pytest.mark.parametrize("strategy", ["no", "epoch"])
def test_turning_the_report_off_runs_no_evaluation_unless_eval_strategy_asks(
    tmp_path, tiny_model_dir, monkeypatch, strategy
):
    from gemma_sft.trainer import GemmaSFTTrainer

    calls = []
    original = GemmaSFTTrainer.evaluate
    monkeypatch.setattr(GemmaSFTTrainer, "evaluate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(10))
    out = tmp_path / "out"
    assert sft_main(_tiny_run(tiny_model_dir, rows, out, "--max_steps", "1", "--eval_strategy", strategy)) == 0
    assert bool(calls) == (strategy == "epoch")  # the old code evaluated every held-out row anyway
    assert (out / "eval_results.json").is_file() == (strategy == "epoch")


# -----------------------------------------------------------------------------------------------------------------
# 6. User mistakes: one line naming file, line and key, before any model loads (the dry run included)
# -----------------------------------------------------------------------------------------------------------------
def _recipe(tmp_path, text: str | bytes) -> Path:
    path = tmp_path / "recipe.yaml"
    base = (REPO_ROOT / DEMO).read_bytes()
    path.write_bytes(base + (text.encode() if isinstance(text, str) else text))
    return path


def _refused(args) -> str:
    with pytest.raises(UserError) as caught:
        sft_main(args)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_recipe_that_is_not_utf8_names_its_line(tmp_path):
    path = _recipe(tmp_path, b"# caf\xe9\n")
    base = (REPO_ROOT / DEMO).read_bytes()
    line, at = base.count(b"\n") + 1, len(base) + len(b"# caf")
    expected = f"{path}:{line}: not valid UTF-8 (byte {at}); save the recipe as UTF-8"
    assert _refused([str(path), "--dry_run"]) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_samples: 3.7\n", "max_samples must be a whole number (got 3.7)"),
        ("max_samples: -3\n", "max_samples must be 0 (all rows) or more (got -3)"),
        ("learning_rate: 0\n", "learning_rate must be above 0 (got 0)"),
        ("packing: 1\n", "packing must be true or false (got 1)"),
        ("lora_dropout: 1.5\n", "lora_dropout must be at least 0 and below 1 (got 1.5)"),
        ("report_prompts: -1\n", "report_prompts must be 0 (no generations) or more (got -1)"),
        ("report_max_new_tokens: 0\n", "report_max_new_tokens must be 1 or more (got 0)"),
    ],
)
def test_recipe_values_that_cannot_work_name_file_line_and_key(tmp_path, text, message):
    path = _recipe(tmp_path, text)  # the last line wins: YAML keeps a repeated key's last value
    line = (REPO_ROOT / DEMO).read_text().count("\n") + 1
    assert _refused([str(path), "--dry_run"]) == f"{path}:{line}: {message}"


def test_a_whole_float_where_an_integer_is_meant_is_taken(tmp_path):
    recipe = config.parse([str(_recipe(tmp_path, "max_samples: 20.0\n")), "--dry_run"])
    assert recipe.data.max_samples == 20 and isinstance(recipe.data.max_samples, int)


def test_a_bad_flag_value_fails_before_the_model_loads_and_writes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from gemma_sft import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(8))
    out = tmp_path / "out"
    for dry in ([], ["--dry_run"]):
        message = _refused([*_tiny_run(tiny_model_dir, rows, out), "--learning_rate", "-1", *dry])
        assert message == "command line: --learning_rate must be above 0 (got -1.0)"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rows.jsonl"]  # no empty output folder


def test_data_mistakes_name_the_file(tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(8))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", belle_rows(5, offset=50))
    base = _tiny_run(tiny_model_dir, rows, tmp_path / "out")
    message = _refused([*base, "--eval_dataset_name", str(held_out), "--eval_samples", "1000", "--dry_run"])
    assert message == (f"{held_out}: eval_samples=1000 but the file has only 5 usable rows; lower eval_samples "
                       "(0 = all of them)")  # fmt: skip
    message = _refused([*base, "--data_path", str(tmp_path), "--dry_run"])
    assert message.startswith(f"{tmp_path}: is a folder, not a data file")


def test_merge_checks_its_output_folder_before_loading_anything(tmp_path, monkeypatch):
    from gemma_sft import export
    from gemma_sft.commands import merge

    monkeypatch.setattr(export, "merged_model", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "merged").mkdir()
    with pytest.raises(UserError, match="already exists: choose another --output or pass --overwrite"):
        merge.main(["--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")])
