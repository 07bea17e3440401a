"""bench/quality.py: time to quality. The arithmetic of the comparison, and its reduced CPU mode end to end."""

import json
import sys

import pytest
from conftest import SAMPLE, run_script, write_jsonl

from gemma_sft import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import quality

EVAL_FILE = REPO_ROOT / "data" / "belle_eval_zh.jsonl"


def curve(*points):
    return [{"wall_s": wall, "loss": loss} for wall, loss in points]


def test_time_to_reach_interpolates_between_measurements():
    points = curve((10, 3.0), (20, 2.6), (30, 2.4))
    assert quality.time_to_reach(points, 2.8) == 15.0
    assert quality.time_to_reach(points, 2.4) == 30.0
    assert quality.time_to_reach(points, 2.3) is None
    assert quality.time_to_reach(curve((10, 3.0), (20, 2.0), (30, 2.9)), 2.9) == 11.0  # the first time, not the last


def test_compare_measures_every_set_up_against_the_original_settings():
    results = [
        {"setup": "original", "curve": curve((5, 3.0), (100, 2.5)), "final_loss": 2.5},
        {"setup": "fast", "curve": curve((8, 3.0), (18, 2.4)), "final_loss": 2.4},
        {"setup": "broken", "error": "boom"},
    ]
    quality.compare(results)
    assert results[0]["to_original_s"] == 100 and results[1]["to_original_s"] == 16.3
    assert "to_original_s" not in results[2]


def test_every_set_up_names_a_recipe_and_flags_sft_accepts():
    from gemma_sft import config

    class Args:
        model_path, train, eval, max_samples, eval_samples, work, cpu, max_steps, flags = (
            "m", "t.jsonl", "e.jsonl", 0, 0, "/tmp/w", True, 2, [])  # fmt: skip

    for name in quality.SETUPS:
        data_args, training_args, _, _, *_ = config.parse([*quality.setup_args(name, Args), "--dry_run"])
        assert data_args.eval_dataset_name == "e.jsonl" and training_args.max_steps == 2
    _, original, _, _, *_ = config.parse([*quality.setup_args("original", Args), "--dry_run"])
    assert not original.packing and original.gradient_accumulation_steps == 4
    assert original.per_device_train_batch_size == 1 and original.learning_rate == 2e-4


@pytest.mark.train
def test_cpu_mode_trains_each_set_up_and_writes_curves_table_and_plot(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [json.loads(line) for line in SAMPLE.read_text().splitlines()[:24]])
    held_out = write_jsonl(
        tmp_path / "eval.jsonl", [json.loads(line) for line in EVAL_FILE.read_text().splitlines()[::40]]
    )
    out = tmp_path / "out"
    result = run_script(
        "bench/quality.py", "--cpu", "--only", "original", "demo", "--model_path", tiny_model_dir, "--train", train,
        "--eval", held_out, "--max_steps", "3", "--evals_per_epoch", "1", "--out", out, "--work", tmp_path / "work",
        "--max_length", "512",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "quality.json").read_text())
    assert [r["setup"] for r in results] == ["original", "demo"]
    for r in results:
        assert r["optimizer_steps"] == 3 and r["trained_tokens"] > 0
        assert r["eval_rows"] == results[0]["eval_rows"] >= 5  # a row longer than max_length is left out of both
        assert [p["step"] for p in r["curve"]] == [0, 3]  # before the first step, then at the end
        assert r["curve"][0]["wall_s"] < r["curve"][-1]["wall_s"] == r["wall_s"]
        in_file = {json.loads(line)["category"] for line in held_out.read_text().splitlines()}
        assert set(r["final_categories"]) == set(r["base_categories"]) and len(r["final_categories"]) >= 4
        assert set(r["final_categories"]) <= in_file
    assert results[0]["base_loss"] == results[1]["base_loss"]  # one base model, one held-out set
    assert results[0]["final_loss"] != results[0]["base_loss"]  # it trained
    assert results[0]["to_original_s"] == results[0]["wall_s"]  # reaches its own final loss at its end
    table = (out / "quality.md").read_text()
    assert "| original | 3 |" in table and "| demo | 3 |" in table
    assert (out / "quality.png").stat().st_size > 1000
