"""Every place where this project replaces part of another library, one entry each, each with a recipe switch.

An entry names what it replaces, the library version it was checked against, and when it applies. `install` turns
the enabled entries on and the others off (idempotent, so set-ups can follow one another in one process); a private
name of another library is read only when its entry is enabled and applies, and a name that has moved stops the run
with one line naming the library, its version and the switch that turns the entry off. The arithmetic each entry
computes is its own module's (fused_qlora, output_head, attention); this module only puts it in place.
"""

import functools
import os
from dataclasses import dataclass
from importlib import metadata

import torch
from transformers import TrainerCallback

from gemma_sft import UserError, attention, cuda_graphs, fused_qlora, modeling


@dataclass(frozen=True)
class Speedup:
    switch: str  # the recipe key (SpeedArguments) that turns it off
    replaces: str
    library: str  # the distribution whose code is replaced
    checked_with: str  # the version of `library` it was checked against (requirements.txt pins it)
    install: callable
    uninstall: callable
    applies: callable = lambda speed, training_args, model_args: True  # speed: the SpeedArguments of the run
    on_train_begin: callable = None  # per-model part, once the Trainer has set the model up (Liger, checkpointing)


# ---------------------------------------------------------------------------------------------------------------
# fused_qlora: PEFT's 4-bit LoRA layer forward -> one autograd function (gemma_sft/fused_qlora.py)
# ---------------------------------------------------------------------------------------------------------------
def _install_fused_qlora() -> None:
    from peft.tuners.lora import bnb as peft_bnb

    peft_forward = peft_bnb.Linear4bit.forward
    if getattr(peft_forward, "fused", False):
        return

    def forward(self, x, *args, **kwargs):
        if fused_qlora.covers(self, x, args, kwargs):
            return fused_qlora.fused_forward(self, x)
        return peft_forward(self, x, *args, **kwargs)

    forward.fused, forward.peft_forward = True, peft_forward
    peft_bnb.Linear4bit.forward = forward


def _uninstall_fused_qlora() -> None:
    from peft.tuners.lora import bnb as peft_bnb

    peft_bnb.Linear4bit.forward = getattr(peft_bnb.Linear4bit.forward, "peft_forward", peft_bnb.Linear4bit.forward)


def _fused_layers_apply(speed, training_args, model_args) -> bool:
    return bool(model_args.load_in_4bit) and not modeling.sharded_launch()  # FSDP/ZeRO-3 shard the quant state


# ---------------------------------------------------------------------------------------------------------------
# keep_mlp_outputs: transformers' per-layer checkpoint function -> one that replays the MLP output
# ---------------------------------------------------------------------------------------------------------------
def keep_mlp_outputs(model) -> int:
    """Mark the MLP down projections of `model`'s checkpointed decoder layers to keep their outputs through the
    recomputation (fused_qlora.kept_outputs_context); returns how many layers now keep them. Call once gradient
    checkpointing is on (the Trainer turns it on when training starts)."""
    from peft.tuners.lora import bnb as peft_bnb

    layers = 0
    for module in model.modules():
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(checkpoint, "keywords", {})
        down = getattr(getattr(module, "mlp", None), "down_proj", None)
        if not getattr(module, "gradient_checkpointing", False) or checkpoint is None or down is None:
            continue
        if not isinstance(down, peft_bnb.Linear4bit) or keywords.get("use_reentrant", True):
            continue  # only the fused 4-bit layer replays; reentrant checkpointing takes no context_fn
        if keywords.get("context_fn") is not fused_qlora.kept_outputs_context:
            module._gradient_checkpointing_func = functools.partial(
                checkpoint, context_fn=fused_qlora.kept_outputs_context
            )
        down.keep_output = True
        layers += 1
    return layers


def _keep_mlp_outputs_apply(speed, training_args, model_args) -> bool:
    # the replayed output is the fused layer's; with torch_compile the compiled layers would trace the replay: untried
    return (
        speed.fused_qlora
        and _fused_layers_apply(speed, training_args, model_args)
        and training_args.gradient_checkpointing
        and not (training_args.torch_compile)
    )


# ---------------------------------------------------------------------------------------------------------------
# fused_output_head: TRL's chunked log-prob function -> one that computes the head's gradient in its forward pass
# ---------------------------------------------------------------------------------------------------------------
def _install_output_head() -> None:
    import trl.trainer.utils as trl_utils

    from gemma_sft import output_head

    trl_utils.__dict__["_ChunkedLogProbFunction"]  # a KeyError if TRL renamed it
    trl_utils._ChunkedLogProbFunction = output_head.LogProbsWithForwardGradient


def _uninstall_output_head() -> None:
    import trl.trainer.utils as trl_utils
    from trl.kernels import ChunkedLogProbFunction

    if "_ChunkedLogProbFunction" in trl_utils.__dict__:
        trl_utils._ChunkedLogProbFunction = ChunkedLogProbFunction


# ---------------------------------------------------------------------------------------------------------------
# pack_in_one_pass: TRL's pack_dataset -> the same, over the whole dataset at once
# ---------------------------------------------------------------------------------------------------------------
# TRL packs through `datasets.map` at its default batch of 1,000 samples and best-fit packing leaves a part-filled row
# at the end of each batch: with rows padded to one shape, about one step in eight of the mission recipe was mostly
# padding. One batch for the whole sample leaves one such row per epoch. TRL offers no public way to set that batch
# without preparing (labelling, shuffling, packing) the dataset ourselves.
PACKING_BATCH = 100_000


def _install_pack_in_one_pass() -> None:
    from trl.trainer import sft_trainer

    trl_pack = sft_trainer.__dict__["pack_dataset"]
    if getattr(trl_pack, "trl_pack", None):
        return

    def pack_dataset(dataset, seq_length, strategy="bfd", map_kwargs=None):
        return trl_pack(dataset, seq_length, strategy, {**(map_kwargs or {}), "batch_size": PACKING_BATCH})

    pack_dataset.trl_pack = trl_pack
    sft_trainer.pack_dataset = pack_dataset


def _uninstall_pack_in_one_pass() -> None:
    from trl.trainer import sft_trainer

    sft_trainer.pack_dataset = getattr(sft_trainer.pack_dataset, "trl_pack", sft_trainer.pack_dataset)


# ---------------------------------------------------------------------------------------------------------------
# tuned_flex_attention: transformers' "flex_attention" entry -> the same with measured kernel options
# ---------------------------------------------------------------------------------------------------------------
# Registered under transformers' own name: the mask builders, TRL and this project's inference code all key on
# "flex_attention", so a new name would need each of them taught it.
def _install_tuned_flex_attention() -> None:
    from transformers.integrations import flex_attention as flex
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if getattr(ALL_ATTENTION_FUNCTIONS["flex_attention"], "tuned", False):
        return

    def tuned(module, query, key, value, attention_mask, **kwargs):
        if query.is_cuda and kwargs.get("kernel_options") is None:
            options = attention.flex_kernel_options(torch.cuda.get_device_capability(query.device), query.shape[-1])
            kwargs = {**kwargs, "kernel_options": options} if options else kwargs
        return flex.flex_attention_forward(module, query, key, value, attention_mask, **kwargs)

    tuned.tuned = True
    AttentionInterface.register("flex_attention", tuned)


def _uninstall_tuned_flex_attention() -> None:
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if getattr(ALL_ATTENTION_FUNCTIONS["flex_attention"], "tuned", False):
        AttentionInterface.register("flex_attention", flex_attention_forward)


# ---------------------------------------------------------------------------------------------------------------
# qk_norm_in_stored_layout: the query/key norms' forward -> the same through the projection's stored layout
# ---------------------------------------------------------------------------------------------------------------
def qk_norm_in_stored_layout(model) -> int:
    """Make the query/key norms of `model`'s attention layers act on their input's stored layout
    (attention.in_stored_layout); returns how many norms. Call after Liger has patched the norms."""
    norms = 0
    for module in model.modules():
        for name in ("q_norm", "k_norm"):
            norm = getattr(module, name, None)
            if isinstance(norm, torch.nn.Module) and hasattr(module, "o_proj"):
                if not getattr(norm.forward, "in_stored_layout", False):
                    norm.forward = attention.in_stored_layout(norm.forward)
                norms += 1
    return norms


# ---------------------------------------------------------------------------------------------------------------
# fsdp_checkpoint_fixes: three places where PEFT 0.21 and accelerate 1.15 lose state under FSDP
# ---------------------------------------------------------------------------------------------------------------
# 1. PEFT picks the adapter's tensors by module name and expects FSDP's `_fsdp_wrapped_module.` only at the start of
#    a name. With a unit per decoder layer and per LoRA leaf the segment also sits mid-name, so the final adapter was
#    saved empty and checkpoints held nothing. The key prefixes here lose every wrapper segment (as FSDP's own state
#    dicts do).
# 2. Loading a checkpoint into the FSDP root: PEFT reads the root's parameter names as those of a model without its
#    `base_model.model.` prefix and loads nothing. Loading goes through the root's PEFT model instead.
# 3. accelerate loads a sharded optimizer checkpoint into the shape of the optimizer's current state, and on resume
#    the optimizer has none yet: the Adam moments were silently dropped. They are created first.
def _install_fsdp_checkpoint_fixes() -> None:
    import peft
    import transformers.trainer
    from peft.tuners import tuners_utils
    from torch.distributed.fsdp import FullyShardedDataParallel

    original_prefixes = tuners_utils.__dict__["_get_tuner_state_dict_key_prefixes"]
    if getattr(original_prefixes, "fixed", None):
        return
    original_load = peft.set_peft_model_state_dict  # what accelerate's FSDP checkpoint loader imports
    load_optimizer = transformers.trainer.__dict__["load_fsdp_optimizer"]

    def key_prefixes(model, adapter_name=None):
        return {prefix.replace("_fsdp_wrapped_module.", "") for prefix in original_prefixes(model, adapter_name)}

    def load_adapter_state(model, *args, **kwargs):
        if isinstance(model, FullyShardedDataParallel):
            model = model.module
        return original_load(model, *args, **kwargs)

    def load_optimizer_state(fsdp_plugin, accelerator, optimizer, *args, **kwargs):
        create_optimizer_state(getattr(optimizer, "optimizer", optimizer))  # accelerate wraps the torch optimizer
        return load_optimizer(fsdp_plugin, accelerator, optimizer, *args, **kwargs)

    key_prefixes.fixed = original_prefixes
    load_adapter_state.fixed = original_load
    load_optimizer_state.fixed = load_optimizer
    tuners_utils._get_tuner_state_dict_key_prefixes = key_prefixes
    peft.set_peft_model_state_dict = load_adapter_state
    transformers.trainer.load_fsdp_optimizer = load_optimizer_state


def _uninstall_fsdp_checkpoint_fixes() -> None:
    import sys

    tuners_utils, trainer = sys.modules.get("peft.tuners.tuners_utils"), sys.modules.get("transformers.trainer")
    places = [(tuners_utils, "_get_tuner_state_dict_key_prefixes"),
              (sys.modules.get("peft"), "set_peft_model_state_dict"), (trainer, "load_fsdp_optimizer")]  # fmt: skip
    for owner, name in places:
        original = getattr(getattr(owner, name, None), "fixed", None)
        if original is not None:
            setattr(owner, name, original)


def create_optimizer_state(optimizer) -> None:
    """Give every trained parameter its optimizer state (Adam's moments) without changing any parameter: one step
    with zero gradients, learning rate 0 and weight decay 0 (optimizers create their state on their first step)."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    kept_settings = [(group["lr"], group.get("weight_decay")) for group in optimizer.param_groups]
    kept_grads = [p.grad for p in params]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, (lr, weight_decay) in zip(optimizer.param_groups, kept_settings):
        group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
    for p, grad in zip(params, kept_grads):
        p.grad = grad


# ---------------------------------------------------------------------------------------------------------------
# cuda_graphs: each Gemma 3 text model's forward, while training on unpacked rows -> replayed CUDA graphs
# ---------------------------------------------------------------------------------------------------------------
def _cuda_graphs_apply(speed, training_args, model_args) -> bool:
    # packed rows are long and one shape, so the GPU's work covers the host's; several processes (DDP, FSDP, ZeRO-3)
    # and torch.compile are untried with graphs
    return (
        not training_args.packing
        and torch.cuda.is_available()
        and not training_args.torch_compile
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
    )


def _nothing() -> None:
    pass


SPEEDUPS = [
    Speedup("fused_qlora", "peft.tuners.lora.bnb.Linear4bit.forward", "peft", "0.21.2",
            _install_fused_qlora, _uninstall_fused_qlora, _fused_layers_apply),
    Speedup("keep_mlp_outputs", "the decoder layers' private _gradient_checkpointing_func", "transformers", "5.17.0",
            _nothing, _nothing, _keep_mlp_outputs_apply, keep_mlp_outputs),
    Speedup("fused_output_head", "trl.trainer.utils._ChunkedLogProbFunction", "trl", "1.16.0",
            _install_output_head, _uninstall_output_head),
    Speedup("pack_in_one_pass", "trl.trainer.sft_trainer.pack_dataset", "trl", "1.16.0",
            _install_pack_in_one_pass, _uninstall_pack_in_one_pass,
            lambda speed, args, model_args: bool(args.packing)),
    Speedup("tuned_flex_attention", 'the "flex_attention" entry of AttentionInterface', "transformers", "5.17.0",
            _install_tuned_flex_attention, _uninstall_tuned_flex_attention,
            lambda speed, args, model_args: model_args.attn_implementation == "flex_attention"),
    Speedup("qk_norm_in_stored_layout", "the forward of each attention layer's q_norm and k_norm", "transformers",
            "5.17.0", _nothing, _nothing, on_train_begin=qk_norm_in_stored_layout),
    Speedup("fast_answer_mask", "transformers' apply_chat_template(return_assistant_tokens_mask=True)",
            "transformers", "5.17.0", _nothing, _nothing),  # data preparation reads the switch (answer_mask.py)
    Speedup("cuda_graphs", "the forward of each Gemma3TextModel while it trains on unpacked rows", "transformers",
            "5.17.0", _nothing, _nothing, _cuda_graphs_apply, cuda_graphs.graph_text_models),
    Speedup("fsdp_checkpoint_fixes",
            "peft's private _get_tuner_state_dict_key_prefixes, peft.set_peft_model_state_dict, "
            "transformers.trainer.load_fsdp_optimizer", "peft", "0.21.2",
            _install_fsdp_checkpoint_fixes, _uninstall_fsdp_checkpoint_fixes,
            lambda speed, args, model_args: modeling.fsdp_launch()),
]  # fmt: skip
BY_SWITCH = {entry.switch: entry for entry in SPEEDUPS}


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


def install(speed, training_args, model_args) -> list[TrainerCallback]:
    """Turn each entry on where its switch (a SpeedArguments field) is true and it applies, off otherwise; returns
    the callback that applies the per-model parts when training starts."""
    fused_qlora.dropout_in_kernels = speed.lora_dropout_in_kernels
    on_train_begin = []
    for entry in SPEEDUPS:
        wanted = getattr(speed, entry.switch) and entry.applies(speed, training_args, model_args)
        if wanted:
            enable(entry.switch)
            if entry.on_train_begin:
                on_train_begin.append(entry.on_train_begin)
        else:
            disable(entry.switch)
    return [_OnTrainBegin(on_train_begin)] if on_train_begin else []
