"""The registry of speed-ups: one entry per replaced piece of another library, each with a working switch, each
undone by its uninstall, and a moved library name reported in one line that names the switch."""

import dataclasses

import pytest
import trl.trainer.utils as trl_utils
from conftest import TINY_RECIPE_FLAGS, belle_rows, write_jsonl
from peft.tuners.lora import bnb as peft_bnb
from transformers import masking_utils
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from trl.kernels import ChunkedLogProbFunction
from trl.trainer import sft_trainer

from gemma_sft import REPO_ROOT, UserError, config, patches
from gemma_sft.config import SpeedArguments


def current(switch: str):
    """What the place an entry replaces holds now."""
    return {
        "fused_qlora": lambda: peft_bnb.Linear4bit.forward,
        "fused_output_head": lambda: (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton),
        "pack_in_one_pass": lambda: sft_trainer.pack_dataset,
        "tuned_flex_attention": lambda: ALL_ATTENTION_FUNCTIONS["flex_attention"],
        "block_masks_without_compile": lambda: masking_utils.create_block_mask,
    }[switch]()


def parts(value) -> tuple:
    """Each name an entry replaces (fused_output_head replaces two)."""
    return value if isinstance(value, tuple) else (value,)


PROCESS_WIDE = ["fused_qlora", "fused_output_head", "pack_in_one_pass", "tuned_flex_attention",
                "block_masks_without_compile"]  # fmt: skip


def test_every_entry_has_a_switch_and_every_switch_an_entry():
    switches = {f.name for f in dataclasses.fields(SpeedArguments)}
    # settings of fused_qlora's and offload_activations'; a batching choice; a use of transformers' own per-layer flag
    not_entries = {"lora_dropout_in_kernels", "fp8_base_matmuls", "offload_kept_outputs", "merge_micro_batches",
                   "kept_layers"}  # fmt: skip
    assert {entry.switch for entry in patches.PATCHES} == switches - not_entries
    kinds = {entry.switch: entry.kind for entry in patches.PATCHES}
    assert set(kinds.values()) == {patches.SPEED, patches.FIX} and kinds["fsdp_checkpoint_fixes"] == patches.FIX
    for entry in patches.PATCHES:
        assert entry.library in ("peft", "trl", "transformers") and entry.checked_with.count(".") == 2
    requirements = (REPO_ROOT / "requirements.txt").read_text()
    for entry in patches.PATCHES:  # checked against the version the project pins
        assert f"{entry.library}=={entry.checked_with}\n" in requirements, entry.switch


@pytest.mark.parametrize("switch", PROCESS_WIDE)
def test_enable_replaces_and_disable_restores(switch):
    patches.disable(switch)
    original = current(switch)
    patches.enable(switch)
    replaced = current(switch)
    assert all(mine is not theirs for mine, theirs in zip(parts(replaced), parts(original)))
    patches.enable(switch)  # idempotent: not wrapped twice
    assert all(now is mine for now, mine in zip(parts(current(switch)), parts(replaced)))
    patches.disable(switch)
    assert all(now is theirs for now, theirs in zip(parts(current(switch)), parts(original)))


def test_a_moved_name_stops_with_the_library_version_and_switch(monkeypatch):
    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    with pytest.raises(UserError) as caught:
        patches.enable("fused_output_head")
    message = str(caught.value)
    assert "trl 1.16.0" in message and "--fused_output_head false" in message and "\n" not in message


def test_the_fsdp_fixes_read_no_private_name_outside_fsdp(monkeypatch):
    from peft.tuners import tuners_utils

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delattr(tuners_utils, "_get_tuner_state_dict_key_prefixes")  # as if PEFT renamed it
    args = SpeedArguments()
    recipe = config.parse(["recipes/gemma3_270m_belle_demo.yaml", "--dry_run"])
    training, model = recipe.training, recipe.model
    patches.install(args, training, model)  # nothing under FSDP: nothing read, nothing refused
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="--fsdp_checkpoint_fixes false"):
        patches.install(args, training, model)


def test_switches_in_a_recipe_reach_the_trainer(tmp_path, tiny_model_dir):
    """Off by flag: TRL's own head and packing stay in place; on (the default): ours are installed."""
    from gemma_sft import data, models
    from gemma_sft.patches import output_head
    from gemma_sft.trainer import build_trainer

    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(8))
    common = ["recipes/gemma3_270m_belle_demo.yaml", "--model_path", str(tiny_model_dir), "--data_path", str(rows),
              "--output_dir", str(tmp_path / "out"), *TINY_RECIPE_FLAGS]  # fmt: skip
    for flags, ours in ((["--fused_output_head", "false", "--pack_in_one_pass", "false"], False), ([], True)):
        recipe = config.parse([*common, *flags])
        tokenizer = models.load_tokenizer(str(tiny_model_dir), recipe.training.chat_template_path)
        prepared = data.prepare_from_settings(recipe.resolved, tokenizer)
        build_trainer(recipe.training, recipe.model, prepared, tokenizer, recipe.speed)
        head = trl_utils._ChunkedLogProbFunction
        assert (head is output_head.LogProbsWithForwardGradient) == ours
        assert (head is ChunkedLogProbFunction) == (not ours)
        assert hasattr(sft_trainer.pack_dataset, "trl_pack") == ours
        assert recipe.resolved.get("fused_output_head", True) == ours
