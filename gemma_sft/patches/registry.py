"""The registry: every place where this project replaces part of another library, one entry each, each with a recipe
switch (a SpeedArguments field), the version of that library it was checked against, and whether it is a speed
lever (same arithmetic, faster) or a correctness fix (without it the result is wrong).

`install` turns the entries that are switched on and apply to the run on, and the others off (idempotent, so set-ups
can follow one another in one process). A private name of another library is read only when its entry is on, and a
name that has moved stops the run with one line naming the library, its version and the switch that turns it off.
The arithmetic and the code that puts it in place are each entry's own module's.
"""

from dataclasses import dataclass
from importlib import metadata

from transformers import TrainerCallback

from gemma_sft import hardware
from gemma_sft.errors import UserError
from gemma_sft.patches import (
    async_steps,
    attention,
    block_masks,
    cuda_graphs,
    fsdp_checkpoints,
    fused_qlora,
    offload_activations,
    output_head,
    packing,
)

SPEED, FIX = "speed", "fix"


def _always(speed, training_args, model_args) -> bool:
    return True


def _under_flex_attention(speed, training_args, model_args) -> bool:
    return model_args.attn_implementation == "flex_attention"


def _under_fsdp(speed, training_args, model_args) -> bool:
    return hardware.fsdp_launch()


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Patch:
    switch: str  # the recipe key (SpeedArguments) that turns it off
    kind: str  # SPEED (same arithmetic, faster) or FIX (without it the result is wrong)
    replaces: str
    library: str  # the distribution whose code is replaced
    checked_with: str  # the version of `library` it was checked against (requirements.txt pins it)
    install: callable = _nothing  # process-wide part, before the model loads
    uninstall: callable = _nothing
    applies: callable = _always  # (speed, training_args, model_args) -> whether the run can use it
    on_train_begin: callable = None  # per-model part, once the Trainer has set the model up (Liger, checkpointing)


PATCHES = [
    Patch("fused_qlora", SPEED, "peft.tuners.lora.bnb.Linear4bit.forward", "peft", "0.21.2",
          fused_qlora.install, fused_qlora.uninstall, fused_qlora.applies),
    Patch("keep_mlp_outputs", SPEED, "the decoder layers' private _gradient_checkpointing_func", "transformers",
          "5.17.0", applies=fused_qlora.keep_outputs_applies, on_train_begin=fused_qlora.keep_mlp_outputs),
    Patch("keep_qkv_outputs", SPEED, "the decoder layers' private _gradient_checkpointing_func", "transformers",
          "5.17.0", applies=fused_qlora.keep_outputs_applies, on_train_begin=fused_qlora.keep_qkv_outputs),
    # after the two above: it wraps the checkpoint function they have set
    Patch("offload_activations", SPEED, "the decoder layers' private _gradient_checkpointing_func (its saved input)",
          "transformers", "5.17.0", applies=offload_activations.applies,
          on_train_begin=offload_activations.offload_layer_inputs),
    Patch("fused_output_head", SPEED, "trl.trainer.utils._ChunkedLogProbFunction and _use_triton", "trl", "1.16.0",
          output_head.install, output_head.uninstall),
    Patch("pack_in_one_pass", SPEED, "trl.trainer.sft_trainer.pack_dataset", "trl", "1.16.0",
          packing.install, packing.uninstall, lambda speed, args, model_args: bool(args.packing)),
    Patch("tuned_flex_attention", SPEED, 'the "flex_attention" entry of AttentionInterface', "transformers", "5.17.0",
          attention.install_tuned_flex, attention.uninstall_tuned_flex, _under_flex_attention),
    Patch("block_masks_without_compile", SPEED, "transformers.masking_utils.create_block_mask (torch's, compiled)",
          "transformers", "5.17.0", block_masks.install, block_masks.uninstall, _under_flex_attention),
    Patch("qk_norm_in_stored_layout", SPEED, "the forward of each attention layer's q_norm and k_norm",
          "transformers", "5.17.0", on_train_begin=attention.qk_norm_in_stored_layout),
    Patch("cuda_graphs", SPEED, "the forward of each Gemma3TextModel while it trains on one GPU",
          "transformers", "5.17.0", applies=cuda_graphs.applies, on_train_begin=cuda_graphs.graph_text_models),
    Patch("async_steps", SPEED, "trl.SFTTrainer.compute_loss's metrics (training, one process) and "
          "transformers.Trainer._track_num_input_tokens (transformers 5.17.0)", "trl", "1.16.0",
          async_steps.install, async_steps.uninstall, async_steps.applies),
    Patch("fsdp_checkpoint_fixes", FIX,
          "peft's private _get_tuner_state_dict_key_prefixes, peft.set_peft_model_state_dict, "
          "transformers.trainer.load_fsdp_optimizer", "peft", "0.21.2",
          fsdp_checkpoints.install, fsdp_checkpoints.uninstall, _under_fsdp),
]  # fmt: skip
BY_SWITCH = {entry.switch: entry for entry in PATCHES}


class _OnTrainBegin(TrainerCallback):
    """Applies the per-model part of the enabled entries once the Trainer has set the model up."""

    def __init__(self, functions):
        self.functions = functions

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for function in self.functions:
            function(model)


def enable(switch: str) -> None:
    """Install one entry (whether or not it applies to a run); a moved name is a one-line UserError."""
    entry = BY_SWITCH[switch]
    try:
        entry.install()
    except (AttributeError, ImportError, KeyError) as exc:
        try:
            installed = metadata.version(entry.library)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        raise UserError(
            f"{switch}: {entry.replaces} is not where {entry.library} {entry.checked_with} had it ({entry.library} "
            f"{installed} is installed; {type(exc).__name__}: {exc}); pass --{switch} false to train without it"
        ) from None


def disable(switch: str) -> None:
    BY_SWITCH[switch].uninstall()


def applying(speed, training_args, model_args) -> list[str]:
    """The switches of the entries that a run with these settings uses (switched on and applicable)."""
    return [e.switch for e in PATCHES if getattr(speed, e.switch) and e.applies(speed, training_args, model_args)]


def install(speed, training_args, model_args) -> list[TrainerCallback]:
    """Turn each entry on where its switch is true and it applies, off otherwise; returns the callback that applies
    the per-model parts when training starts."""
    fused_qlora.dropout_in_kernels = speed.lora_dropout_in_kernels
    fused_qlora.fp8_base_matmuls = speed.fp8_base_matmuls
    offload_activations.kept_outputs_too = speed.offload_kept_outputs
    wanted = set(applying(speed, training_args, model_args))
    on_train_begin = []
    for entry in PATCHES:
        if entry.switch in wanted:
            enable(entry.switch)
            if entry.on_train_begin:
                on_train_begin.append(entry.on_train_begin)
        else:
            disable(entry.switch)
    return [_OnTrainBegin(on_train_begin)] if on_train_begin else []
