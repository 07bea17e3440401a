"""Recipes are TRL field names: every shipped recipe parses, unknown keys fail with file:line, flags win."""

from pathlib import Path

import pytest
from conftest import gemma3_4b_on_meta, mission_lora, run_script

from gemma_sft import REPO_ROOT, UserError, config
from gemma_sft.hardware import DEMO, MISSION, SINGLE_GPU, default_recipe, train_command

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes_to_check():
    names = {path.name for path in RECIPES}
    assert {"gemma3_belle.yaml", "gemma3_270m_belle_demo.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_every_recipe_parses_with_only_known_keys(recipe):
    config.load_recipe(recipe)  # raises on unknown keys
    _data_args, training_args, _model_args, resolved = config.parse([str(recipe), "--dry_run"])
    assert resolved["output_dir"] == training_args.output_dir
    assert training_args.chat_template_path == "chat_templates/gemma3.jinja"
    assert not training_args.fp16


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", REPO_ROOT / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


BENCH = load_bench()


@pytest.mark.parametrize("name", sorted(BENCH.SETUPS))
def test_every_benchmark_setup_parses(name):
    """GPU time is scarce: a misspelt flag in a benchmark set-up should fail here, not on the GPU machine."""
    _description, recipe, flags, launcher = BENCH.SETUPS[name]
    _data_args, training_args, _model_args, _ = config.parse([recipe, *flags, "--dry_run"])
    if BENCH.gpus_needed(launcher) == 2:
        assert training_args.gradient_accumulation_steps == 2  # the one-GPU global batch, for comparable curves


def test_mission_recipe_keeps_the_original_tool_settings():
    data_args, args, model_args, _ = config.parse([MISSION, "--dry_run"])
    assert model_args.model_name_or_path == "google/gemma-3-4b-it"
    assert data_args.dataset_name == "BelleGroup/train_0.5M_CN"
    assert (data_args.max_samples, args.seed) == (2000, 42)
    assert model_args.load_in_4bit and model_args.use_bnb_nested_quant and model_args.bnb_4bit_quant_type == "nf4"
    assert model_args.dtype == "bfloat16"
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 32, 0.1)
    assert args.optim.value == "paged_adamw_32bit" and args.learning_rate == 2e-4 and args.weight_decay == 0.001
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 4)
    assert args.max_grad_norm == 0.3 and args.num_train_epochs == 3
    assert args.lr_scheduler_type.value == "constant_with_warmup" and args.warmup_steps == 0.03
    assert args.report_to == ["tensorboard"]


def test_fast_recipe_is_the_mission_recipe_with_its_two_levers():
    """The fast recipe must not drift from the mission recipe in anything but the levers its header names."""
    mission = config.load_recipe(MISSION)
    fast = config.load_recipe(REPO_ROOT / "recipes" / "gemma3_belle_fast.yaml")
    changed = {key for key in mission.keys() | fast.keys() if mission.get(key) != fast.get(key)}
    assert changed == {"lora_dropout", "gradient_checkpointing_kwargs", "output_dir"}
    assert fast["lora_dropout"] == 0 and fast["gradient_checkpointing_kwargs"] == {"every_n_layers": 2}
    _, args, _, _ = config.parse([str(REPO_ROOT / "recipes" / "gemma3_belle_fast.yaml"), "--dry_run"])
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"every_n_layers": 2}


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
    _, args, _, resolved = config.parse([MISSION, "--num_train_epochs", "1", "--dry_run"])
    assert args.num_train_epochs == 1 and resolved["num_train_epochs"] == 1
    with pytest.raises(UserError, match=r"unknown flag '--num_train_epoks'.*did you mean '--num_train_epochs'"):
        config.parse([MISSION, "--num_train_epoks", "1"])
    with pytest.raises(UserError, match=r"unknown flag '--num_train_epoch'"):  # no guessing from prefixes
        config.parse([MISSION, "--num_train_epoch", "1"])


def test_original_tool_flags_are_aliases():
    data_args, args, model_args, _ = config.parse(
        [MISSION, "--model_path", "m", "--data_path=d.jsonl", "--epochs", "2", "--batch_size", "8",
         "--output_path", "out", "--dry_run"]
    )  # fmt: skip
    assert model_args.model_name_or_path == "m" and data_args.dataset_name == "d.jsonl"
    assert args.num_train_epochs == 2 and args.per_device_train_batch_size == 8 and args.output_dir == "out"


def test_make_train_picks_the_recipe_and_launcher_by_hardware():
    assert default_recipe(has_cuda=True) == MISSION
    assert default_recipe(has_cuda=False) == DEMO
    assert Path(REPO_ROOT / MISSION).is_file() and Path(REPO_ROOT / DEMO).is_file()
    gpu = train_command(None, has_cuda=True)
    assert gpu[1:] == ["-m", "accelerate.commands.launch", "--config_file", SINGLE_GPU, "sft.py", MISSION]
    assert (REPO_ROOT / SINGLE_GPU).is_file()
    assert train_command(None, has_cuda=False)[1:] == ["sft.py", DEMO]
    assert train_command("recipes/x.yaml", has_cuda=False)[-1] == "recipes/x.yaml"
    result = run_script("-m", "gemma_sft.hardware")
    assert result.returncode == 0 and "make train: recipes/gemma3_270m_belle_demo.yaml (no CUDA GPU" in result.stderr
    assert result.stdout.strip().endswith("sft.py recipes/gemma3_270m_belle_demo.yaml")


def test_lora_targets_the_language_model_only_with_the_expected_parameter_count():
    """On the real gemma-3-4b-it architecture (meta tensors: no memory), r=16 gives 29,802,496 trainable weights."""
    peft_model = mission_lora(gemma3_4b_on_meta())
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == 29_802_496
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert len(adapted) == 34 * 7
    assert all(".language_model." in name for name in adapted)
