"""Recipes are TRL field names: every shipped recipe parses, unknown keys fail with file:line, flags win."""

import os
from pathlib import Path

import pytest
import yaml
from conftest import gemma3_4b_on_meta, mission_lora, run_script

from gemma_sft import REPO_ROOT, UserError, config, plan
from gemma_sft.hardware import (
    DEMO,
    HEADROOM_GIB,
    KEPT_LAYER_GIB,
    LOW_MEMORY,
    MISSION,
    MISSION_RESERVED_GIB,
    SINGLE_GPU,
    default_recipe,
    kept_layers_for,
    train_command,
)

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes_to_check():
    names = {path.name for path in RECIPES}
    assert {"gemma3_belle.yaml", "gemma3_270m_belle_demo.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_every_recipe_parses_with_only_known_keys(recipe, tmp_path):
    config.load_recipe(recipe)  # raises on unknown keys
    _data_args, training_args, _model_args, resolved, *_ = config.parse([str(recipe), "--dry_run"])
    assert resolved["output_dir"] == training_args.output_dir
    assert training_args.chat_template_path == "chat_templates/gemma3.jinja"
    assert not training_args.fp16
    # the resolved recipe a run writes (output_dir/recipe.yaml) is itself a recipe that gives the same run
    written = tmp_path / "recipe.yaml"
    written.write_text(yaml.safe_dump(resolved, allow_unicode=True, sort_keys=False), encoding="utf-8")
    _, again, _, resolved_again, *_ = config.parse([str(written), "--dry_run"])
    assert resolved_again == resolved
    assert again.include_num_input_tokens_seen == training_args.include_num_input_tokens_seen


def test_mission_recipe_keeps_the_original_tool_settings():
    data_args, args, model_args, _, *_ = config.parse([MISSION, "--dry_run"])
    assert model_args.model_name_or_path == "google/gemma-3-4b-it"
    assert data_args.dataset_name == "BelleGroup/train_0.5M_CN"
    assert (data_args.max_samples, args.seed) == (2000, 42)
    assert model_args.load_in_4bit and model_args.use_bnb_nested_quant and model_args.bnb_4bit_quant_type == "nf4"
    assert model_args.dtype == "bfloat16"
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 32, 0.1)
    # the original tool's paged_adamw_32bit takes the same steps (tests/test_optimizer.py)
    assert args.optim.value == "adamw_torch_fused" and args.learning_rate == 2e-4 and args.weight_decay == 0.001
    # packed: one row of 8,192 tokens per optimizer step (the low-memory recipe's 2 x 4,096, in one pass)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_length) == (1, 1, 8192)
    assert args.packing and args.pad_to_multiple_of == args.max_length  # one shape: kernels compile once
    assert args.max_grad_norm == 0.3 and args.num_train_epochs == 3
    assert args.lr_scheduler_type.value == "constant_with_warmup" and args.warmup_steps == 0.03
    assert args.report_to == ["tensorboard"]


def test_low_memory_recipe_is_the_mission_job_in_smaller_rows():
    """The low-memory recipe must not drift from the mission recipe: the same job, split into more, shorter rows, and
    the MLP outputs recomputed rather than kept (exact either way: test_fused_qlora)."""
    mission = config.load_recipe(MISSION)
    low = config.load_recipe(REPO_ROOT / LOW_MEMORY)
    changed = {key for key in mission.keys() | low.keys() if mission.get(key) != low.get(key)}
    assert changed == {"max_length", "gradient_accumulation_steps", "pad_to_multiple_of", "keep_mlp_outputs"}
    assert mission["keep_mlp_outputs"] and not low["keep_mlp_outputs"]
    _, mission_args, _, _, *_ = config.parse([MISSION, "--dry_run"])
    _, low_args, _, _, *_ = config.parse([str(REPO_ROOT / LOW_MEMORY), "--dry_run"])
    per_step = [a.max_length * a.per_device_train_batch_size * a.gradient_accumulation_steps
                for a in (mission_args, low_args)]  # fmt: skip
    assert per_step[0] == per_step[1]  # tokens per optimizer step, and so the number of steps and the schedule
    assert (low_args.max_length, low_args.gradient_accumulation_steps) == (4096, 2)
    assert low_args.pad_to_multiple_of == low_args.max_length  # one shape, as in the mission recipe


def test_several_gpus_are_told_the_flags_that_keep_the_one_gpu_batch():
    """Data parallelism multiplies the tokens per step; sft.py names the flags that give them back."""
    _, mission, _, _, *_ = config.parse([MISSION, "--dry_run"])
    _, low, _, _, *_ = config.parse([str(REPO_ROOT / LOW_MEMORY), "--dry_run"])
    assert config.one_gpu_batch_flags(low, 2) == "--gradient_accumulation_steps 1"
    assert config.one_gpu_batch_flags(low, 4) == "--max_length 1024 --pad_to_multiple_of 1024"
    assert config.one_gpu_batch_flags(mission, 2) == "--max_length 4096 --pad_to_multiple_of 4096"
    assert config.one_gpu_batch_flags(low, 3) is None  # neither 2 steps nor 4,096 tokens split in 3
    _, halved, _, _, *_ = config.parse([MISSION, "--max_length", "4096", "--pad_to_multiple_of", "4096", "--dry_run"])
    assert 2 * halved.max_length * halved.gradient_accumulation_steps == mission.max_length


def test_unknown_recipe_key_names_file_line_and_suggestion(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: x\n\nlearning_rat: 0.1\n", encoding="utf-8")
    with pytest.raises(
        UserError, match=r"bad\.yaml:3: unknown recipe key 'learning_rat' \(did you mean 'learning_rate'"
    ):
        config.parse([str(recipe)])


def test_bad_value_and_bad_yaml_are_reported_against_the_recipe(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("learning_rate: fast\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.yaml: field 'learning_rate': invalid value 'fast'"):
        config.parse([str(recipe)])
    recipe.write_text("learning_rate: [1,\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: invalid YAML"):
        config.parse([str(recipe)])


def test_command_line_overrides_the_recipe_and_unknown_flags_fail():
    _, args, _, resolved, *_ = config.parse([MISSION, "--num_train_epochs", "1", "--dry_run"])
    assert args.num_train_epochs == 1 and resolved["num_train_epochs"] == 1
    with pytest.raises(UserError, match=r"unknown flag '--num_train_epoks'.*did you mean '--num_train_epochs'"):
        config.parse([MISSION, "--num_train_epoks", "1"])
    with pytest.raises(UserError, match=r"unknown flag '--num_train_epoch'"):  # no guessing from prefixes
        config.parse([MISSION, "--num_train_epoch", "1"])


def test_original_tool_flags_are_aliases():
    data_args, args, model_args, _, *_ = config.parse(
        [MISSION, "--model_path", "m", "--data_path=d.jsonl", "--epochs", "2", "--batch_size", "8",
         "--output_path", "out", "--dry_run"]
    )  # fmt: skip
    assert model_args.model_name_or_path == "m" and data_args.dataset_name == "d.jsonl"
    assert args.num_train_epochs == 2 and args.per_device_train_batch_size == 8 and args.output_dir == "out"


def test_make_train_picks_the_recipe_and_launcher_by_hardware():
    assert default_recipe(has_cuda=True, gpu_gib=23.6) == MISSION  # a 24 GB card
    assert default_recipe(has_cuda=True, gpu_gib=22.0) == MISSION  # a 24 GB L4
    assert default_recipe(has_cuda=True, gpu_gib=14.6) == MISSION  # a 16 GB T4
    assert default_recipe(has_cuda=True, gpu_gib=11.7) == MISSION  # a 12 GB card
    assert default_recipe(has_cuda=True, gpu_gib=9.8) == LOW_MEMORY  # a 10 GB card
    assert default_recipe(has_cuda=True, gpu_gib=7.6) == LOW_MEMORY  # an 8 GB card
    assert default_recipe(has_cuda=False) == DEMO
    assert all(Path(REPO_ROOT / recipe).is_file() for recipe in (MISSION, LOW_MEMORY, DEMO))
    launch = ["-m", "accelerate.commands.launch", "--config_file", SINGLE_GPU, "sft.py"]
    # the layers that keep their activations, from the free memory (docs/PERFORMANCE.md, The speed and memory curve)
    assert train_command(None, has_cuda=True, gpu_gib=11.7)[1:] == [*launch, MISSION, "--kept_layers", "1"]  # 12 GB
    assert train_command(None, has_cuda=True, gpu_gib=11.0)[1:] == [*launch, MISSION]  # no room for a layer
    kept = {gib: kept_layers_for(gib) for gib in (14.6, 23.6, 31.4, 39.4, 79.2)}
    assert kept == {14.6: 5, 23.6: 15, 31.4: 24, 39.4: 34, 79.2: 34}  # 16, 24, 32, 40 and 80 GB cards
    for gib, layers in kept.items():  # the estimated peak leaves the headroom on each card
        assert MISSION_RESERVED_GIB + layers * KEPT_LAYER_GIB + HEADROOM_GIB <= gib
        assert train_command(None, has_cuda=True, gpu_gib=gib)[1:] == [*launch, MISSION, "--kept_layers", str(layers)]
    assert train_command(None, has_cuda=True, gpu_gib=9.8)[1:] == [*launch, LOW_MEMORY]  # nothing added to it
    assert train_command(MISSION, has_cuda=True, gpu_gib=79.2)[1:] == [*launch, MISSION]  # a recipe named: as it is
    parsed = config.parse([MISSION, "--kept_layers", "24", "--dry_run"])
    assert parsed.training.gradient_checkpointing and parsed.speed.kept_layers == 24  # sft.py reads the flag
    assert (REPO_ROOT / SINGLE_GPU).is_file()
    assert train_command(None, has_cuda=False)[1:] == ["sft.py", DEMO]
    assert train_command("recipes/x.yaml", has_cuda=False)[-1] == "recipes/x.yaml"
    result = run_script("-m", "gemma_sft.hardware", "--print")
    assert result.returncode == 0 and "make train: recipes/gemma3_270m_belle_demo.yaml (no CUDA GPU" in result.stderr
    assert result.stdout.strip().endswith("sft.py recipes/gemma3_270m_belle_demo.yaml")


def test_make_train_counts_memory_other_processes_hold(tmp_path, monkeypatch):
    """The free memory `make train` sizes kept_layers by is the card's total less what nvidia-smi reports in use
    (a display, another job); nothing is subtracted where nvidia-smi cannot say."""
    from gemma_sft import hardware

    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\n[ "$3 $4" = "-i GPU-abc" ] && echo 3072\n')  # MiB in use on the GPU asked about
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert hardware._held_by_others_gib("GPU-abc") == 3.0
    assert hardware._held_by_others_gib("GPU-other") == 0.0  # no answer for that GPU
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert hardware._held_by_others_gib("GPU-abc") == 0.0  # no nvidia-smi at all


def test_lora_targets_the_language_model_only_with_the_expected_parameter_count():
    """On the real gemma-3-4b-it architecture (meta tensors: no memory), r=16 gives 29,802,496 trainable weights."""
    peft_model = mission_lora(gemma3_4b_on_meta())
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == 29_802_496
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert len(adapted) == 34 * 7
    assert all(".language_model." in name for name in adapted)


def test_unpacked_runs_drop_the_packed_row_shape_and_flex_attention():
    """`--packing false` on a packed recipe pads each batch to a multiple of 128, not to the 8,192-token row, and
    uses sdpa (flex_attention would compile again for each new length); flags given on the command line win."""
    _, args, model_args, resolved, *_ = config.parse([MISSION, "--packing", "false", "--dry_run"])
    assert args.pad_to_multiple_of == plan.UNPACKED_PAD == 128 and model_args.attn_implementation == "sdpa"
    assert resolved["pad_to_multiple_of"] == 128 and resolved["attn_implementation"] == "sdpa"
    _, args, model_args, _, *_ = config.parse([MISSION, "--packing", "false", "--pad_to_multiple_of", "4096",
                                           "--attn_implementation", "flex_attention", "--dry_run"])  # fmt: skip
    assert args.pad_to_multiple_of == 4096 and model_args.attn_implementation == "flex_attention"
    _, args, model_args, _, *_ = config.parse([MISSION, "--dry_run"])
    assert args.pad_to_multiple_of == 8192 and model_args.attn_implementation == "flex_attention"


def test_make_train_passes_the_launchers_failure_on():
    """make must fail when the launcher does, not print "Nothing to be done" and exit 0."""
    import subprocess

    result = subprocess.run(["make", "-s", "train", "PY=/bin/false"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "Nothing to be done" not in result.stdout + result.stderr


def test_a_recipes_held_out_file_goes_with_the_recipes_data():
    demo = "recipes/gemma3_270m_belle_demo.yaml"
    data_args, _, _, resolved, *_ = config.parse([demo, "--dry_run"])
    assert data_args.eval_dataset_name == resolved["eval_dataset_name"] == "data/belle_eval_zh.jsonl"
    data_args, _, _, resolved, *_ = config.parse([demo, "--data_path", "mine.jsonl", "--dry_run"])
    assert data_args.eval_dataset_name is None and resolved["eval_dataset_name"] is None  # split off mine.jsonl
    data_args, _, _, _, *_ = config.parse(
        [demo, "--data_path", "m.jsonl", "--eval_dataset_name", "e.jsonl", "--dry_run"]
    )
    assert data_args.eval_dataset_name == "e.jsonl"
