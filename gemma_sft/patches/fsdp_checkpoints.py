"""A correctness fix, not a speed lever: where PEFT 0.21 and accelerate 1.15 lose the adapter or the optimizer's
state in FSDP checkpoints (switch fsdp_checkpoint_fixes)."""

import torch


# 1. PEFT picks the adapter's tensors by module name and expects FSDP's `_fsdp_wrapped_module.` only at the start of
#    a name. With a unit per decoder layer and per LoRA leaf the segment also sits mid-name, so the final adapter was
#    saved empty and checkpoints held nothing. The key prefixes here lose every wrapper segment (as FSDP's own state
#    dicts do).
# 2. Loading a checkpoint into the FSDP root: PEFT reads the root's parameter names as those of a model without its
#    `base_model.model.` prefix and loads nothing. Loading goes through the root's PEFT model instead.
# 3. accelerate loads a sharded optimizer checkpoint into the shape of the optimizer's current state, and on resume
#    the optimizer has none yet: the Adam moments were silently dropped. They are created first.
def install() -> None:
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


def uninstall() -> None:
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
