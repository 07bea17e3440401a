"""The benchmarks' set-ups are recipes plus flags: each must still parse against the recipe it names, and each
Unsloth set-up must be compared with one of ours at the same tokens per optimizer step, whatever the recipes say."""

import importlib.util

import pytest

from gemma_sft import REPO_ROOT, config


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench, quality, scale_check = _load("bench"), _load("quality"), _load("scale_check")


def _tokens_per_step(recipe: str, flags: list[str]) -> int:
    _, args, *_ = config.parse([str(recipe), *flags, "--dry_run"])
    return args.max_length * args.per_device_train_batch_size * args.gradient_accumulation_steps


@pytest.mark.parametrize("name", sorted(bench.SETUPS))
def test_every_speed_setup_parses_against_its_recipe(name):
    _, recipe, flags, _ = bench.SETUPS[name]
    config.parse([str(recipe), *flags, "--dry_run"])  # unknown flags or bad values raise


@pytest.mark.parametrize("name", sorted(quality.SETUPS))
def test_every_quality_setup_parses_against_its_recipe(name):
    _, recipe, flags = quality.SETUPS[name]
    config.parse([str(REPO_ROOT / recipe), *flags, "--dry_run"])


@pytest.mark.parametrize("name", sorted(bench.UNSLOTH))
def test_unsloth_is_compared_at_the_same_tokens_per_step(name):
    tokens, ours = bench.UNSLOTH[name]
    _, recipe, flags, launcher = bench.SETUPS[ours]
    assert launcher is None  # one process, as Unsloth runs
    assert _tokens_per_step(recipe, flags) == tokens


def test_the_shipped_recipes_are_the_setups_their_names_say():
    """`ours` and `low_memory` are the recipes as shipped; `ours_16k` is the mission at 16,384 tokens per step."""
    assert bench.SETUPS["ours"][1:3] == (bench.MISSION, [])
    assert bench.SETUPS["low_memory"][1:3] == (bench.LOW_MEMORY, [])
    assert _tokens_per_step(*bench.SETUPS["ours_16k"][1:3]) == 16384
    assert _tokens_per_step(*bench.SETUPS["ours_8k"][1:3]) == 8192


def _without(flags: list[str], part: list[str]) -> list[str] | None:
    """flags with the first run of `part` taken out; None if `part` is not in them."""
    for i in range(len(flags) - len(part) + 1):
        if flags[i : i + len(part)] == part:
            return flags[:i] + flags[i + len(part) :]
    return None


def test_two_gpu_runs_keep_the_one_gpu_tokens_per_step():
    """Data parallelism multiplies the rows per step; every several-GPU set-up lowers its accumulation to match, so
    its loss curve compares with the one-GPU run of the same flags."""
    several = {name: setup for name, setup in bench.SETUPS.items() if bench.gpus_needed(setup[3]) > 1}
    assert several  # the set-ups of the Several GPUs table
    for name, (_, recipe, flags, launcher) in several.items():
        one_gpu = _without(flags, bench.SAME_BATCH_ON_2)
        assert one_gpu is not None, name
        assert bench.gpus_needed(launcher) * _tokens_per_step(recipe, flags) == _tokens_per_step(recipe, one_gpu), name
    recipe = REPO_ROOT / scale_check.RECIPE
    assert 2 * _tokens_per_step(recipe, scale_check.SAME_BATCH_ON_2) == _tokens_per_step(recipe, [])
