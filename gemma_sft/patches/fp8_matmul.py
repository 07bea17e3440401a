"""The frozen weight's matmuls of fused_qlora.py in FP8 (e4m3), one scale per row, for GPUs with FP8 tensor cores.

On Hopper and Ada a matmul of e4m3 operands runs at twice bf16's rate. Both operands of the frozen weight's product
(the activations or the output gradient, and the weight dequantized from NF4) are scaled row by row so that each
row's largest magnitude lands between half and all of e4m3's range (a power-of-two scale: exact to apply and to
undo), rounded to e4m3, multiplied by torch._scaled_mm, and the scales applied in its epilogue, giving bf16. The
adapter's own matmuls, its gradients and the optimizer stay in bf16 and fp32: only the frozen weight's product is
rounded further, and that weight is already rounded to 4 bits. Unlike the other levers this changes the arithmetic
(about 4% relative error per product). Off: as built it is slower than bf16 (docs/PERFORMANCE.md, the switches),
since each operand's scaling here is several element-wise passes; a gain would need the NF4 weight unpacked straight
to e4m3 and the activations' scaling fused into the kernels that produce them.
"""

import functools

import torch

E4M3 = torch.float8_e4m3fn
_TOP = torch.finfo(E4M3).max  # 448
_ALIGN = 16  # _scaled_mm wants the inner and output widths in multiples of 16
_FIRST_FP8_GPU = (8, 9)  # compute capability of the first GPUs with FP8 tensor cores (Ada)


def supported(device: torch.device) -> bool:
    """FP8 matmuls with a scale per row exist here (why_not says why they do not)."""
    return not why_not(device)


def why_not(device: torch.device) -> str:
    """Why FP8 matmuls with a scale per row cannot run on `device`, or "" where they can: CUDA compute capability
    8.9 or later (Ada, Hopper, Blackwell), or a torch whose CPU kernels take row scales (2.13 does, 2.11 does not)."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability >= _FIRST_FP8_GPU:
            return ""
        return "this GPU (compute capability {}.{}) has no FP8 matmuls ({}.{} or later needed)".format(
            *capability, *_FIRST_FP8_GPU
        )
    if device.type == "cpu" and not _cpu_takes_row_scales():
        return "no GPU, and this torch's CPU kernels have no FP8 matmul with row scales"
    return "" if device.type == "cpu" else f"no FP8 matmuls on {device.type}"


@functools.cache
def _cpu_takes_row_scales() -> bool:
    ones = torch.ones(16, 16, dtype=E4M3)
    try:
        torch._scaled_mm(ones, ones.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def fits(x2d: torch.Tensor, weight_shape) -> bool:
    """Whether x2d @ W^T (W of `weight_shape`, (out, in)) and its input gradient can run in FP8 here."""
    out_features, in_features = weight_shape
    # on GPUs the row-scaled kernels give bf16 only; torch's CPU kernels also give fp32 (the tests' tiny models)
    dtypes = (torch.bfloat16,) if x2d.device.type == "cuda" else (torch.bfloat16, torch.float32)
    return x2d.dtype in dtypes and out_features % _ALIGN == 0 and in_features % _ALIGN == 0 and supported(x2d.device)


def rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (2-D) as e4m3 values, contiguous, and the fp32 scale of each row (rows, 1): t ~= values * scale."""
    amax = torch.linalg.vector_norm(t, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    # the largest power of two that keeps the row's largest magnitude within e4m3's range (zero rows: any scale)
    exponent = torch.floor(torch.log2(_TOP / amax.clamp_(min=1e-30))).clamp_(-100, 100)
    values = torch.empty(t.shape, device=t.device, dtype=E4M3)
    values.copy_(t * torch.exp2(exponent).to(t.dtype))  # a power of two: multiplying is exact, one rounding to e4m3
    return values, torch.exp2(-exponent)


def linear(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2d @ weight^T in x2d's dtype: x scaled per token, the weight per output feature."""
    x8, x_scale = rowwise(x2d)
    w8, w_scale = rowwise(weight)  # (out, in) row-major: its transpose is the column-major operand _scaled_mm wants
    return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=x2d.dtype)


def input_grad(grad2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad2d @ weight in grad2d's dtype: the gradient scaled per token, the weight per input feature."""
    g8, g_scale = rowwise(grad2d)
    wt8, wt_scale = rowwise(weight.t())  # (in, out) row-major, so its transpose is (out, in) column-major
    return torch._scaled_mm(g8, wt8.t(), scale_a=g_scale, scale_b=wt_scale.view(1, -1), out_dtype=grad2d.dtype)
