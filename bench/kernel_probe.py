"""Time the LoRA dropout kernels (patches/lora_dropout.py) at the mission's shapes for a few block sizes, against
cuBLAS doing the same products without dropout. On a GPU: python bench/kernel_probe.py"""

import functools
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma_sft.patches import lora_dropout as kernels

ROWS, RANK, P = 32768, 16, 0.1


def timed(fn, reps=20) -> float:
    """Median milliseconds of fn() on the GPU."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(sorted(times)[reps // 2], 4)


def launch(kernel, grid, *args, **constants):
    kernel[grid](*args, **constants)


def probe(features: int) -> dict:
    x = torch.randn(ROWS, features, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(RANK, features, device="cuda", dtype=torch.bfloat16) * 0.05
    grad_down = torch.randn(ROWS, RANK, device="cuda", dtype=torch.bfloat16)
    seed = kernels.new_seed(x.device)
    threshold, scale = kernels._threshold_and_scale(P)
    row = {
        "cublas_down": timed(functools.partial(torch.mm, x, a.t())),
        "cublas_grad_x": timed(functools.partial(torch.mm, grad_down, a)),
        "cublas_grad_a": timed(functools.partial(torch.mm, grad_down.t(), x)),
        "grad_a_now": timed(functools.partial(kernels.grad_a, grad_down, x, P, seed)),
    }
    down = torch.empty(ROWS, RANK, device="cuda", dtype=torch.bfloat16)
    for block_m, block_k, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
        row[f"down_m{block_m}_k{block_k}_w{warps}_s{stages}"] = timed(
            functools.partial(
                launch, kernels._down_kernel, (triton.cdiv(ROWS, block_m),),
                x, a, down, seed, ROWS, features, RANK, threshold, scale,
                RANK=16, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
            )
        )  # fmt: skip
    grad_x = torch.empty(ROWS, features, device="cuda", dtype=torch.bfloat16)
    for block_m, block_k, warps in itertools.product((32, 64, 128), (64, 128, 256), (4, 8)):
        row[f"grad_x_m{block_m}_k{block_k}_w{warps}"] = timed(
            functools.partial(
                launch, kernels._grad_x_kernel, (triton.cdiv(ROWS, block_m), triton.cdiv(features, block_k)),
                grad_x, grad_down, a, seed, ROWS, features, RANK, threshold, scale,
                RANK=16, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
            )
        )  # fmt: skip
    return row


results = {}
for features in (2560, 10240):
    row = results[features] = probe(features)
    best = {kind: min((v, k) for k, v in row.items() if k.startswith(kind)) for kind in ("down_m", "grad_x_m")}
    now = {k: row[k] for k in ("down_m64_k64_w4_s2", "down_m64_k64_w4_s3", "grad_x_m64_k128_w4")}
    print(features, {k: v for k, v in row.items() if k.startswith(("cublas", "grad_a"))}, "now", now, "best", best)
print(json.dumps(results))
