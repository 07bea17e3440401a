"""Gemma 3's attention in training: two changes for speed (neither changes the arithmetic) and one kernel avoided.

- The query and key norms act on each head's vector, the last dimension. Gemma 3 applies them after transposing the
  projections to (batch, heads, tokens, head_dim), a strided view of what the projection wrote; Liger's RMSNorm then
  copies the view into that layout and Liger's rotary kernel copies it back, forward and backward. Normalising the
  view through the layout it is stored in skips those copies.
- flex_attention's backward kernel for Gemma 3's 256-wide heads runs faster with 8 warps than with the 4 PyTorch picks
  on H100/H200 (bench/flex_probe.py).
- sdpa trains with PyTorch's memory-efficient kernels instead of cuDNN's (avoid_cudnn_attention).
"""

import torch

FLEX_BACKWARD_OPTIONS = {(9, 0): {256: {"bwd_num_warps": 8}}}  # compute capability -> head_dim -> kernel options


def flex_kernel_options(capability: tuple[int, int], head_dim: int) -> dict | None:
    """The flex_attention kernel options measured faster for this card and head size, or None for PyTorch's own."""
    return FLEX_BACKWARD_OPTIONS.get(capability, {}).get(head_dim)


def in_stored_layout(norm_forward):
    """A norm forward that normalises a transposed (batch, heads, tokens, head_dim) view through its stored layout."""

    def forward(x):
        if x.dim() == 4 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
            return norm_forward(x.transpose(1, 2)).transpose(1, 2)
        return norm_forward(x)

    forward.in_stored_layout = True
    return forward


def avoid_cudnn_attention(attn_implementation: str) -> bool:
    """Turn off cuDNN's scaled-dot-product attention for training with sdpa on a GPU; True where it did.

    Since torch 2.11 (checked on 2.11 and 2.13) cuDNN is sdpa's first choice on H100/H200, and its backward pass
    returns NaN query gradients when a mask is given, the length is 64 more than a multiple of 128 and some query row
    attends to nothing, or nearly nothing (pytorch/pytorch#196678). Padded batches of unpacked rows meet all three: a
    padding position past the end of a short row has no key in its sliding window. The loss stays finite and every
    weight becomes NaN at the next optimizer step. The memory-efficient kernels compute the same attention.
    """
    if attn_implementation != "sdpa" or not torch.cuda.is_available():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


# Putting it in place (gemma_sft/patches/registry.py turns it on and off)
# Registered under transformers' own name: the mask builders, TRL and this project's inference code all key on
# "flex_attention", so a new name would need each of them taught it.
def install_tuned_flex() -> None:
    from transformers.integrations import flex_attention as flex
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if getattr(ALL_ATTENTION_FUNCTIONS["flex_attention"], "tuned", False):
        return

    def tuned(module, query, key, value, attention_mask, **kwargs):
        if query.is_cuda and kwargs.get("kernel_options") is None:
            options = flex_kernel_options(torch.cuda.get_device_capability(query.device), query.shape[-1])
            kwargs = {**kwargs, "kernel_options": options} if options else kwargs
        return flex.flex_attention_forward(module, query, key, value, attention_mask, **kwargs)

    tuned.tuned = True
    AttentionInterface.register("flex_attention", tuned)


def uninstall_tuned_flex() -> None:
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if getattr(ALL_ATTENTION_FUNCTIONS["flex_attention"], "tuned", False):
        AttentionInterface.register("flex_attention", flex_attention_forward)


def qk_norm_in_stored_layout(model) -> int:
    """Make the query/key norms of `model`'s attention layers act on their input's stored layout
    (in_stored_layout); returns how many norms. Call after Liger has patched the norms."""
    norms = 0
    for module in model.modules():
        for name in ("q_norm", "k_norm"):
            norm = getattr(module, name, None)
            if isinstance(norm, torch.nn.Module) and hasattr(module, "o_proj"):
                if not getattr(norm.forward, "in_stored_layout", False):
                    norm.forward = in_stored_layout(norm.forward)
                norms += 1
    return norms
