"""LoRA dropout without a dropped copy of the input: the keep mask is drawn inside the kernels that use it.

PEFT's LoRA dropout writes `dropout(x)` (a full copy of the layer input) and its mask, and the backward pass reads
the copy again and multiplies by the mask once more. In a 4-bit layer that copy is the only full-size tensor the
adapter adds. Here each element's keep decision is a counter-based random number (Philox, keyed by a per-call seed
and the element's index), so any kernel can redraw it: the A projection reads x and drops elements as it loads
them, and the backward pass redraws the same mask for A's gradient and for the input gradient. Nothing of x's size
is written or kept. The seed comes from the GPU's generator, which gradient checkpointing saves and restores, so a
recomputed forward pass draws the same mask.

Same distribution as PEFT's dropout (each element kept with probability 1 - p, then scaled by 1 / (1 - p)), with p
rounded to a multiple of 1/65536 (0.1 becomes 0.100006), not the same random stream.
"""

import functools

import torch
import triton
import triton.language as tl

MAX_RANK = 128  # the A projection keeps (rows, rank) accumulators in registers


@triton.jit
def _keep(seed, rows, first_col, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep decisions for rows x [first_col, first_col + BLOCK_K): one Philox draw (4 x 32 bits) covers 8 adjacent
    elements of a row, 16 bits each, so the kernels that redraw the mask spend little on arithmetic."""
    groups = rows[:, None] * (K // 8) + (first_col // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, groups)
    pairs = (tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16),
             tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))  # fmt: skip
    draws = tl.join(tl.join(pairs[0], pairs[1]), tl.join(pairs[2], pairs[3]))  # (rows, groups, 2, 2, 2)
    return tl.reshape(draws, (BLOCK_M, BLOCK_K)) >= threshold


@triton.jit
def _down_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, M, K, rank, threshold, scale,
                 RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """out[M, rank] = (keep(x) * scale) @ a.T"""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, RANK)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        offsets = rows[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        x = tl.where(_keep(seed, rows, start, K, threshold, BLOCK_M, BLOCK_K), x, tl.zeros_like(x))
        a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=(ranks[None, :] < rank) & (cols[:, None] < K),
                    other=0.0)  # fmt: skip
        acc = tl.dot(x, a, acc)
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * rank + ranks[None, :], out, mask=(rows[:, None] < M) & (ranks[None, :] < rank))


@triton.jit
def _grad_a_kernel(grad_down_ptr, x_ptr, partial_ptr, seed_ptr, M, K, rank, threshold, rows_per_split,
                   RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """partial[split, RANK, K] = grad_down[rows of split].T @ keep(x)[rows of split] (unscaled)"""
    first_col = tl.program_id(0) * BLOCK_K
    cols = first_col + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, RANK)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((RANK, BLOCK_K), dtype=tl.float32)
    first = split * rows_per_split
    for start in range(first, first + rows_per_split, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        inside = rows[:, None] < M
        offsets = rows[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside & (cols[None, :] < K), other=0.0)
        x = tl.where(_keep(seed, rows, first_col, K, threshold, BLOCK_M, BLOCK_K), x, tl.zeros_like(x))
        g = tl.load(grad_down_ptr + rows[:, None] * rank + ranks[None, :], mask=inside & (ranks[None, :] < rank),
                    other=0.0)  # fmt: skip
        acc = tl.dot(tl.trans(g), x, acc)
    tl.store(partial_ptr + (split * RANK + ranks[:, None]) * K + cols[None, :], acc, mask=cols[None, :] < K)


@triton.jit
def _grad_x_kernel(grad_x_ptr, grad_down_ptr, a_ptr, seed_ptr, M, K, rank, threshold, scale,
                   RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   ACCUMULATE: tl.constexpr):  # fmt: skip
    """grad_x = keep(grad_down @ a) * scale, or grad_x += that with ACCUMULATE"""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    first_col = tl.program_id(1) * BLOCK_K
    cols = first_col + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, RANK)
    seed = tl.load(seed_ptr)
    g = tl.load(grad_down_ptr + rows[:, None] * rank + ranks[None, :],
                mask=(rows[:, None] < M) & (ranks[None, :] < rank), other=0.0)  # fmt: skip
    a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < rank) & (cols[None, :] < K),
                other=0.0)  # fmt: skip
    lora = tl.where(_keep(seed, rows, first_col, K, threshold, BLOCK_M, BLOCK_K), tl.dot(g, a) * scale, 0.0)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    if ACCUMULATE:
        lora += tl.load(grad_x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + rows[:, None] * K + cols[None, :], lora.to(grad_x_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _keep_mask_kernel(out_ptr, seed_ptr, M, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    first_col = tl.program_id(1) * BLOCK_K
    cols = first_col + tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), rows, first_col, K, threshold, BLOCK_M, BLOCK_K)
    tl.store(
        out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.uint8), mask=(rows[:, None] < M) & (cols[None, :] < K)
    )


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs 16 or more along each side


def supports(x: torch.Tensor, rank: int) -> bool:
    """Contiguous input on a CUDA device, features in whole Philox groups of 8, a rank the kernels hold in registers,
    element indices within 31 bits."""
    return x.is_cuda and x.is_contiguous() and x.shape[-1] % 8 == 0 and rank <= MAX_RANK and x.numel() < 2**31


def _threshold_and_scale(p: float) -> tuple[int, float]:
    """A 16-bit draw below the threshold drops its element; kept elements are scaled by the scale."""
    threshold = round(p * 65536)
    return threshold, 65536 / (65536 - threshold)


def effective_p(p: float) -> float:
    """The drop probability the kernels apply: p rounded to the 16-bit draws' resolution."""
    return _threshold_and_scale(p)[0] / 65536


def new_seed(device: torch.device) -> torch.Tensor:
    """One Philox key, drawn on the device (no host sync) from the generator that checkpointing restores."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int32)


def down(x2d: torch.Tensor, lora_a: torch.Tensor, p: float, seed: torch.Tensor,
         block_m=32, block_k=128, num_warps=4, num_stages=3) -> torch.Tensor:  # fmt: skip
    """dropout(x) @ A.T, shape (tokens, rank), in x's dtype. The block sizes are bench/kernel_probe.py's to vary: rows
    of 32 make enough programs to fill the GPU at 8,192 tokens, where rows of 64 left it latency-bound."""
    (m, k), rank = x2d.shape, lora_a.shape[0]
    out = torch.empty(m, rank, device=x2d.device, dtype=x2d.dtype)
    _down_kernel[(triton.cdiv(m, block_m),)](
        x2d, lora_a.contiguous(), out, seed, m, k, rank, *_threshold_and_scale(p),
        RANK=_rank_block(rank), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def grad_a(grad_down: torch.Tensor, x2d: torch.Tensor, p: float, seed: torch.Tensor,
           block_m=64, block_k=64, num_warps=4) -> torch.Tensor:  # fmt: skip
    """grad_down.T @ dropout(x) with the forward pass's mask, shape (rank, features), in fp32."""
    (m, k), rank = x2d.shape, grad_down.shape[1]
    # enough programs to fill the GPU: column blocks x row splits, each split summed into its own fp32 partial
    programs = 4 * _multiprocessors(x2d.device)
    splits = max(1, min(triton.cdiv(m, 1024), triton.cdiv(programs, triton.cdiv(k, block_k))))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows_per_split)
    rank_block = _rank_block(rank)
    threshold, scale = _threshold_and_scale(p)
    partial = torch.empty(splits, rank_block, k, device=x2d.device, dtype=torch.float32)
    _grad_a_kernel[(triton.cdiv(k, block_k), splits)](
        grad_down.contiguous(), x2d, partial, seed, m, k, rank, threshold, rows_per_split,
        RANK=rank_block, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return partial.sum(0)[:rank].mul_(scale)


def grad_x(grad_down: torch.Tensor, lora_a: torch.Tensor, p: float, seed: torch.Tensor, into=None,
           block_m=64, block_k=128, num_warps=4) -> torch.Tensor:  # fmt: skip
    """dropout'(grad_down @ A): the adapter branch's input gradient, masked as its input was, in grad_down's dtype.
    Written, and the frozen weight's input gradient then added into it by its own matmul (addmm_); or, with `into`
    (a contiguous (rows, features) tensor holding that gradient already), added into it."""
    (m, rank), k = grad_down.shape, lora_a.shape[1]
    out = into if into is not None else torch.empty(m, k, device=grad_down.device, dtype=grad_down.dtype)
    _grad_x_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
        out, grad_down.contiguous(), lora_a.contiguous(), seed, m, k, rank, *_threshold_and_scale(p),
        RANK=_rank_block(rank), BLOCK_M=block_m, BLOCK_K=block_k, ACCUMULATE=into is not None, num_warps=num_warps,
    )  # fmt: skip
    return out


def keep_mask(rows: int, features: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The mask the kernels draw for this seed, as a (rows, features) bool tensor: for tests."""
    out = torch.empty(rows, features, device=seed.device, dtype=torch.uint8)
    grid = (triton.cdiv(rows, 64), triton.cdiv(features, 64))
    _keep_mask_kernel[grid](out, seed, rows, features, _threshold_and_scale(p)[0], BLOCK_M=64, BLOCK_K=64)
    return out.bool()
