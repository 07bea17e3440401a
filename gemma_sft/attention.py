"""Two changes to Gemma 3's attention for training speed; neither changes the arithmetic.

- The query and key norms act on each head's vector, the last dimension. Gemma 3 applies them after transposing the
  projections to (batch, heads, tokens, head_dim), a strided view of what the projection wrote; Liger's RMSNorm then
  copies the view into that layout and Liger's rotary kernel copies it back, forward and backward. Normalising the
  view through the layout it is stored in skips those copies.
- flex_attention's backward kernel for Gemma 3's 256-wide heads runs faster with 8 warps than with the 4 PyTorch picks
  on H100/H200 (bench/flex_probe.py).
"""

import torch
from transformers import TrainerCallback

FLEX_BACKWARD_OPTIONS = {(9, 0): {256: {"bwd_num_warps": 8}}}  # compute capability -> head_dim -> kernel options


def flex_kernel_options(capability: tuple[int, int], head_dim: int) -> dict | None:
    """The flex_attention kernel options measured faster for this card and head size, or None for PyTorch's own."""
    return FLEX_BACKWARD_OPTIONS.get(capability, {}).get(head_dim)


def tune_flex_attention() -> None:
    """Route transformers' flex_attention through `flex_kernel_options`; idempotent, and calls that bring their own
    kernel options keep them."""
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.modeling_utils import AttentionInterface

    def tuned(module, query, key, value, attention_mask, **kwargs):
        if query.is_cuda and kwargs.get("kernel_options") is None:
            options = flex_kernel_options(torch.cuda.get_device_capability(query.device), query.shape[-1])
            kwargs = {**kwargs, "kernel_options": options} if options else kwargs
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("flex_attention", tuned)


def _in_stored_layout(norm_forward):
    def forward(x):
        if x.dim() == 4 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
            return norm_forward(x.transpose(1, 2)).transpose(1, 2)
        return norm_forward(x)

    forward.in_stored_layout = True
    return forward


def norm_heads_in_stored_layout(model) -> int:
    """Make the query/key norms of `model`'s attention layers act on their input's stored layout; returns how many
    norms. Call after Liger has patched the norms (the Trainer does that when training starts)."""
    norms = 0
    for module in model.modules():
        for name in ("q_norm", "k_norm"):
            norm = getattr(module, name, None)
            if isinstance(norm, torch.nn.Module) and hasattr(module, "o_proj"):
                if not getattr(norm.forward, "in_stored_layout", False):
                    norm.forward = _in_stored_layout(norm.forward)
                norms += 1
    return norms


class NormHeadsInStoredLayout(TrainerCallback):
    """Applies `norm_heads_in_stored_layout` once the Trainer has applied Liger's kernels (as training starts)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        norm_heads_in_stored_layout(model)
