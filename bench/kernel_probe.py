"""Time the LoRA dropout kernels (patches/lora_dropout.py) at the recipes' shapes for several block sizes, against
cuBLAS doing the same products without dropout and against the bytes they must move.

    python bench/kernel_probe.py                       # rows of 8,192 and 16,384; features 2,048, 2,560, 10,240
    python bench/kernel_probe.py --rows 4096 8192 --out bench/results/DATE-CARD-kernel-probe.json

The kernels read each input element once (A's product and A's gradient) or write it once (the input gradient), so
their floor is the bytes over the card's copy bandwidth, printed as `floor_ms`. With few rows a block of 64 rows
gives fewer programs than the GPU has multiprocessors, which is why smaller row blocks are in the sweep. Needs a
CUDA GPU; prints one line per shape (now, best, floor) and writes every timing as JSON.
"""

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma_sft.patches import lora_dropout as kernels

RANK, P = 16, 0.1
# what lora_dropout.py launches today, to compare the sweep with
NOW = {"down": "m64_k64_w4_s3", "grad_x": "m64_k128_w4", "grad_a": "m64_k64_w4"}


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


def copy_bandwidth() -> float:
    """Bytes per millisecond of a device-to-device copy (read + write), the floor's yardstick."""
    src = torch.empty(1 << 28, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(functools.partial(dst.copy_, src))


def launch(kernel, grid, *args, **constants):
    kernel[grid](*args, **constants)


def grad_a_launch(grad_down, x, seed, rows, features, threshold, block_m, block_k, warps, programs):
    """lora_dropout.grad_a's split-K launch with other block sizes: column blocks x row splits, then the sum (fp32,
    unscaled); `programs` is how many the launch aims for (4 per multiprocessor, as grad_a)."""
    splits = max(1, min(triton.cdiv(rows, 1024), triton.cdiv(programs, triton.cdiv(features, block_k))))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
    splits = triton.cdiv(rows, rows_per_split)
    partial = torch.empty(splits, RANK, features, device=x.device, dtype=torch.float32)
    kernels._grad_a_kernel[(triton.cdiv(features, block_k), splits)](
        grad_down, x, partial, seed, rows, features, RANK, threshold, rows_per_split,
        RANK=RANK, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return partial.sum(0)


def probe(rows: int, features: int, bandwidth: float) -> dict:
    x = torch.randn(rows, features, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(RANK, features, device="cuda", dtype=torch.bfloat16) * 0.05
    grad_down = torch.randn(rows, RANK, device="cuda", dtype=torch.bfloat16)
    seed = kernels.new_seed(x.device)
    threshold, scale = kernels._threshold_and_scale(P)
    programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    row = {
        "floor_ms": round(x.numel() * x.element_size() / bandwidth, 4),
        "cublas_down": timed(functools.partial(torch.mm, x, a.t())),
        "cublas_grad_x": timed(functools.partial(torch.mm, grad_down, a)),
        "cublas_grad_a": timed(functools.partial(torch.mm, grad_down.t(), x)),
    }
    down = torch.empty(rows, RANK, device="cuda", dtype=torch.bfloat16)
    for block_m, block_k, warps, stages in itertools.product((16, 32, 64, 128), (64, 128), (4, 8), (2, 3)):
        row[f"down_m{block_m}_k{block_k}_w{warps}_s{stages}"] = timed(
            functools.partial(
                launch, kernels._down_kernel, (triton.cdiv(rows, block_m),),
                x, a, down, seed, rows, features, RANK, threshold, scale,
                RANK=RANK, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
            )
        )  # fmt: skip
    grad_x = torch.empty(rows, features, device="cuda", dtype=torch.bfloat16)
    for block_m, block_k, warps in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8)):
        row[f"grad_x_m{block_m}_k{block_k}_w{warps}"] = timed(
            functools.partial(
                launch, kernels._grad_x_kernel, (triton.cdiv(rows, block_m), triton.cdiv(features, block_k)),
                grad_x, grad_down, a, seed, rows, features, RANK, threshold, scale,
                RANK=RANK, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, ACCUMULATE=False,
            )
        )  # fmt: skip
    for block_m, block_k, warps in itertools.product((32, 64, 128), (32, 64, 128), (4, 8)):
        row[f"grad_a_m{block_m}_k{block_k}_w{warps}"] = timed(
            functools.partial(
                grad_a_launch, grad_down, x, seed, rows, features, threshold, block_m, block_k, warps, programs
            )
        )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8192, 16384], help="tokens per packed row")
    parser.add_argument("--features", type=int, nargs="+", default=[2048, 2560, 10240], help="layer input widths")
    parser.add_argument("--out", help="JSON file for every timing (default: print only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: the probe needs a CUDA GPU", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth()
    results = {"card": torch.cuda.get_device_name(), "copy_gb_per_s": round(bandwidth / 1e6, 1), "shapes": {}}
    for rows, features in itertools.product(args.rows, args.features):
        row = results["shapes"][f"{rows}x{features}"] = probe(rows, features, bandwidth)
        summary = {}
        for kind in NOW:
            timings = {k[len(kind) + 1 :]: v for k, v in row.items() if k.startswith(kind + "_m")}
            best = min(timings, key=timings.get)
            summary[kind] = f"now {timings[NOW[kind]]} ms, best {timings[best]} ms ({best})"
        print(f"{rows} x {features}: floor {row['floor_ms']} ms;", "; ".join(f"{k} {v}" for k, v in summary.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
