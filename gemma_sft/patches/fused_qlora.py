"""A 4-bit linear layer and its LoRA adapter as one autograd function, for training speed.

PEFT computes a QLoRA layer as bitsandbytes' 4-bit matmul, a defensive copy of its output, then the adapter branch
(dropout, A, B, a multiply by the scaling, an add), each a separate kernel and a separate node of the autograd graph.
With many short packed samples per row the GPU finishes these faster than Python issues them, so the host sets the
pace. Here the same arithmetic is one function: dequantize, one matmul for A, one for B, and the frozen weight's
product added into that output by its own matmul (in place), with a backward pass written out by hand. On a GPU,
LoRA dropout happens inside the adapter's kernels (lora_dropout.py) instead of as a dropped copy of the
input. Same results up to rounding and, with dropout, up to the random draw; layers it does not cover keep PEFT's own
forward. With `fp8_base_matmuls` the frozen weight's two matmuls run in FP8 where the GPU has FP8 tensor cores
(fp8_matmul.py); that one changes the rounding, not only the speed.
"""

import contextlib
import functools

import torch

from gemma_sft import hardware
from gemma_sft.patches import fp8_matmul

dropout_in_kernels = True  # False: PEFT's dropout module makes the dropped copy (switch lora_dropout_in_kernels)
fp8_base_matmuls = False  # True: the frozen weight's products in FP8 where the device and shapes allow (its switch)


class QLoRALinear(torch.autograd.Function):
    """y = x W^T + scaling * (dropout(x) A^T) B^T, with W frozen in 4 bits and A, B trained.

    The frozen weight's matmul runs in x's dtype; the adapter's own matmuls run in `lora_dtype`, as PEFT runs them
    (the autocast dtype, else the adapter weights' dtype: bf16 for QLoRA adapters made by TRL). `lora_x` is x, or
    x after PEFT's dropout; with `dropout_p` > 0 (lora_x is x, on a GPU) the kernels drop elements themselves.
    `kept`, a dict or None, carries a layer's results from a checkpointed first pass to its recomputation (below).
    """

    @staticmethod
    def forward(ctx, x, lora_x, packed_weight, quant_state, lora_a, lora_b, scaling, lora_dtype, dropout_p, kept=None):
        import bitsandbytes.functional as bnb_functional

        dtype = x.dtype
        a, b = lora_a.to(lora_dtype), lora_b.to(lora_dtype)
        x2d, lora_x2d = x.reshape(-1, x.shape[-1]), lora_x.reshape(-1, lora_x.shape[-1]).to(lora_dtype)
        ctx.dropout_p, ctx.seed = dropout_p, None
        replaying = kept is not None and "out" in kept  # a recomputation handing back the first pass's results
        if dropout_p:
            kernels = _dropout_kernels()
            seed = kernels.new_seed(x.device)  # drawn even when replaying: the generator advances as it did
            ctx.seed = kept["seed"] if replaying else seed
        if replaying:
            down = kept["down"]
        elif dropout_p:
            down = kernels.down(lora_x2d, a, dropout_p, ctx.seed)
        else:
            down = lora_x2d @ a.t()  # (tokens, r): small, kept for the backward pass
        ctx.save_for_backward(lora_x2d, down, a, b)
        ctx.packed_weight, ctx.quant_state, ctx.scaling = packed_weight, quant_state, scaling
        ctx.shared_input = lora_x is x
        ctx.shapes = (x.shape, lora_x.shape, lora_x.dtype, lora_a.dtype, lora_b.dtype)
        ctx.fp8 = fp8_base_matmuls and fp8_matmul.fits(x2d, quant_state.shape)
        if replaying:
            return kept["out"]
        if kept is not None:  # the first pass of a layer that keeps its results for the recomputation
            kept.update(down=down, seed=ctx.seed)
        weight = bnb_functional.dequantize_4bit(packed_weight, quant_state).to(dtype)
        if ctx.fp8:  # the frozen weight's product rounded through FP8, then the adapter's output added into it
            out = fp8_matmul.linear(x2d, weight)
            if lora_dtype == dtype:
                out.addmm_(down, b.t(), alpha=scaling)
            else:
                out.add_((down @ b.t()).mul_(scaling).to(dtype))
        elif lora_dtype == dtype:  # the usual case on GPUs (bf16 under autocast): the adapter's output first, then the
            # frozen weight's product added into it by the large matmul itself (in place: addmm copies its input)
            out = torch.empty(x2d.shape[0], weight.shape[0], device=x.device, dtype=dtype)
            out.addmm_(down, b.t(), beta=0, alpha=scaling).addmm_(x2d, weight.t())
        else:  # rounded as PEFT rounds it: the adapter's output in its own dtype, then added
            out = (x2d @ weight.t()).add_((down @ b.t()).mul_(scaling).to(dtype))
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        import bitsandbytes.functional as bnb_functional

        lora_x2d, down, a, b = ctx.saved_tensors
        x_shape, lora_x_shape, lora_x_dtype, a_dtype, b_dtype = ctx.shapes
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        lora_grad2d = grad2d.to(down.dtype)
        grad_down = (lora_grad2d @ b).mul_(ctx.scaling)  # (tokens, r)
        kernels = _dropout_kernels() if ctx.dropout_p else None
        if kernels:
            grad_a = kernels.grad_a(grad_down, lora_x2d, ctx.dropout_p, ctx.seed).to(a_dtype)
        else:
            grad_a = (grad_down.t() @ lora_x2d).to(a_dtype)
        grad_b = (lora_grad2d.t() @ down).mul_(ctx.scaling).to(b_dtype)
        grad_x = grad_lora_x = None
        if ctx.needs_input_grad[0] or (ctx.shared_input and ctx.needs_input_grad[1]):
            weight = bnb_functional.dequantize_4bit(ctx.packed_weight, ctx.quant_state).to(grad2d.dtype)
            if ctx.fp8:  # the frozen weight's part through FP8 first, the adapter branch's added into it
                grad_x = fp8_matmul.input_grad(grad2d, weight)
                if kernels:
                    kernels.grad_x(grad_down, a, ctx.dropout_p, ctx.seed, into=grad_x)
                elif ctx.shared_input:
                    grad_x.addmm_(grad_down.to(grad2d.dtype), a.to(grad2d.dtype))
                grad_x = grad_x.view(x_shape)
            # otherwise the adapter branch's input gradient first, the large matmul adding the frozen weight's into it
            elif kernels:  # masked as the adapter's input was
                grad_x = kernels.grad_x(grad_down, a, ctx.dropout_p, ctx.seed).addmm_(grad2d, weight).view(x_shape)
            elif ctx.shared_input:  # no dropout: both branches saw x
                grad_x = (grad_down.to(grad2d.dtype) @ a.to(grad2d.dtype)).addmm_(grad2d, weight).view(x_shape)
            else:
                grad_x = (grad2d @ weight).view(x_shape)
        if not ctx.shared_input and ctx.needs_input_grad[1]:
            grad_lora_x = (grad_down @ a).to(lora_x_dtype).view(lora_x_shape)
        return grad_x, grad_lora_x, None, None, grad_a, grad_b, None, None, None, None


def fused_forward(layer, x):
    """QLoRALinear for a layer that `covers` accepts."""
    name = layer.active_adapters[0]
    dropout = layer.lora_dropout[name]
    p = 0.0 if isinstance(dropout, torch.nn.Identity) or not dropout.training else dropout.p
    lora_a = layer.lora_A[name].weight
    lora_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else lora_a.dtype
    lora_x, kernel_p = x, 0.0
    if (
        p
        and dropout_in_kernels
        and lora_dtype == x.dtype
        and x.is_cuda
        and _dropout_kernels().supports(x, lora_a.shape[0])
    ):
        kernel_p = p
    elif p:
        lora_x = dropout(x)
    kept = None
    if getattr(layer, "keep_output", False) and _checkpoint_phase:
        by_layer, replaying = _checkpoint_phase
        kept = by_layer.pop(layer, None) if replaying else by_layer.setdefault(layer, {})
        if replaying and kept is not None and not isinstance(kept.get("out"), torch.Tensor):
            kept["out"] = kept["out"].take()  # held elsewhere meanwhile (offload_activations.KeptOnHost)
    out = QLoRALinear.apply(
        x, lora_x, layer.base_layer.weight, layer.base_layer.weight.quant_state, lora_a, layer.lora_B[name].weight,
        layer.scaling[name], lora_dtype, kernel_p, kept,
    )  # fmt: skip
    if kept is not None and "out" not in kept:  # the first pass: the output joins what QLoRALinear kept (autograd
        kept["out"] = out.detach()  # refuses in-place changes to a custom Function's outputs, so it stays as read)
        if kept_output_stash is not None:
            kept["out"] = kept_output_stash(kept["out"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Outputs kept through gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------
# Gradient checkpointing runs each decoder layer's forward pass again in the backward pass, matmuls included. A layer
# marked `keep_output` (the MLP's down projection: 2,560 values per token out of 10,240 in, the most recomputed
# arithmetic per byte kept; optionally the query, key and value projections) keeps its output, its adapter's small
# product and its dropout seed from the first pass, and the recomputation hands them back instead of computing them.
_checkpoint_phase = None  # (outputs kept by layer, replaying?) while a checkpointed decoder layer runs
# tensor -> what the kept dict holds instead until the recomputation (offload_activations.py sets it), or None
kept_output_stash = None


@contextlib.contextmanager
def _phase(kept: dict, replaying: bool):
    global _checkpoint_phase
    previous, _checkpoint_phase = _checkpoint_phase, (kept, replaying)
    try:
        yield
    finally:
        _checkpoint_phase = previous


def kept_outputs_context():
    """torch.utils.checkpoint's context_fn: the first pass keeps marked layers' outputs, the recomputation reuses
    them."""
    kept = {}
    return _phase(kept, replaying=False), _phase(kept, replaying=True)


def _dropout_kernels():
    from gemma_sft.patches import lora_dropout  # imports Triton: only where a GPU runs the layer

    return lora_dropout


def covers(layer, x, args, kwargs) -> bool:
    """Plain LoRA on a bias-free 4-bit layer, one adapter, x in the dtype the layer computes in; PEFT does the rest."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return False
    base = layer.base_layer
    if base.bias is not None or getattr(base.weight, "quant_state", None) is None:  # no quant state: FSDP-sharded
        return False
    if x.dtype != (base.compute_dtype or x.dtype):
        return False
    if torch.is_autocast_enabled(x.device.type):  # PEFT's adapter branch then runs in the autocast dtype
        return x.dtype == torch.get_autocast_dtype(x.device.type)
    return layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype


# Putting it in place (gemma_sft/patches/registry.py turns it on and off)
def install() -> None:
    from peft.tuners.lora import bnb as peft_bnb

    peft_forward = peft_bnb.Linear4bit.forward
    if getattr(peft_forward, "fused", False):
        return

    def forward(self, x, *args, **kwargs):
        if covers(self, x, args, kwargs):
            return fused_forward(self, x)
        return peft_forward(self, x, *args, **kwargs)

    forward.fused, forward.peft_forward = True, peft_forward
    peft_bnb.Linear4bit.forward = forward


def uninstall() -> None:
    from peft.tuners.lora import bnb as peft_bnb

    peft_bnb.Linear4bit.forward = getattr(peft_bnb.Linear4bit.forward, "peft_forward", peft_bnb.Linear4bit.forward)


def applies(speed, training_args, model_args) -> bool:
    return bool(model_args.load_in_4bit) and not hardware.sharded_launch()  # FSDP/ZeRO-3 shard the quant state


def keep_mlp_outputs(model) -> int:
    """Mark the MLP down projections of `model`'s checkpointed decoder layers to keep their outputs through the
    recomputation (kept_outputs_context); returns how many layers now keep them. Call once gradient
    checkpointing is on (the Trainer turns it on when training starts)."""
    return _keep_outputs(model, lambda layer: [getattr(getattr(layer, "mlp", None), "down_proj", None)])


def keep_qkv_outputs(model) -> int:
    """The same for each checkpointed layer's query, key and value projections: 2 bytes x (query + key + value
    widths) per token per layer (4,096 values on the 4B, against 2,560 for the MLP output) save three of the
    recomputation's products and their adapters' kernels, without the attention and norms that follow them."""
    attention = ("q_proj", "k_proj", "v_proj")
    return _keep_outputs(model, lambda layer: [getattr(getattr(layer, "self_attn", None), n, None) for n in attention])


def _keep_outputs(model, projections_of) -> int:
    """Mark the projections `projections_of(layer)` names in each checkpointed layer where all are fused 4-bit
    layers, wrapping the layer's checkpoint function once with kept_outputs_context."""
    from peft.tuners.lora import bnb as peft_bnb

    layers = 0
    for module in model.modules():
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(checkpoint, "keywords", {})
        chosen = projections_of(module)
        if (
            not getattr(module, "gradient_checkpointing", False)
            or checkpoint is None
            or any(p is None for p in chosen)
        ):
            continue
        if not all(isinstance(p, peft_bnb.Linear4bit) for p in chosen) or keywords.get("use_reentrant", True):
            continue  # only the fused 4-bit layer replays; reentrant checkpointing takes no context_fn
        if keywords.get("context_fn") is not kept_outputs_context:
            module._gradient_checkpointing_func = functools.partial(checkpoint, context_fn=kept_outputs_context)
        for projection in chosen:
            projection.keep_output = True
        layers += 1
    return layers


def keep_outputs_applies(speed, training_args, model_args) -> bool:
    # the replayed output is the fused layer's; with torch_compile the compiled layers would trace the replay: untried
    return (
        speed.fused_qlora
        and applies(speed, training_args, model_args)
        and training_args.gradient_checkpointing
        and not (training_args.torch_compile)
    )
