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
import inspect
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma_sft.patches import lora_dropout as kernels

RANK, P = 16, 0.1
SWEEP = {  # the kernels' wrappers in lora_dropout.py and the block settings tried for each
    kernels.down: dict(block_m=(16, 32, 64, 128), block_k=(64, 128), num_warps=(4, 8), num_stages=(2, 3)),
    kernels.grad_x: dict(block_m=(16, 32, 64, 128), block_k=(64, 128, 256), num_warps=(4, 8)),
    kernels.grad_a: dict(block_m=(32, 64, 128), block_k=(32, 64, 128), num_warps=(4, 8)),
}


def label(settings: dict) -> str:
    return "_".join(f"{name}{value}" for name, value in settings.items())


def launched_now(wrapper) -> str:
    """The label of the settings the wrapper launches by default, as the training step calls it."""
    defaults = inspect.signature(wrapper).parameters
    return label({name: defaults[name].default for name in SWEEP[wrapper]})


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


def probe(rows: int, features: int, bandwidth: float) -> dict:
    x = torch.randn(rows, features, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(RANK, features, device="cuda", dtype=torch.bfloat16) * 0.05
    grad_down = torch.randn(rows, RANK, device="cuda", dtype=torch.bfloat16)
    seed = kernels.new_seed(x.device)
    row = {
        "floor_ms": round(x.numel() * x.element_size() / bandwidth, 4),
        "cublas_down": timed(functools.partial(torch.mm, x, a.t())),
        "cublas_grad_x": timed(functools.partial(torch.mm, grad_down, a)),
        "cublas_grad_a": timed(functools.partial(torch.mm, grad_down.t(), x)),
    }
    arguments = {
        kernels.down: (x, a, P, seed),
        kernels.grad_x: (grad_down, a, P, seed),
        kernels.grad_a: (grad_down, x, P, seed),
    }
    for wrapper, options in SWEEP.items():
        for values in itertools.product(*options.values()):
            settings = dict(zip(options, values))
            row[f"{wrapper.__name__}_{label(settings)}"] = timed(
                functools.partial(wrapper, *arguments[wrapper], **settings)
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
        for wrapper in SWEEP:
            name = wrapper.__name__
            timings = {k[len(name) + 1 :]: v for k, v in row.items() if k.startswith(name + "_block")}
            best, now = min(timings, key=timings.get), launched_now(wrapper)
            summary[name] = f"now {timings[now]} ms, best {timings[best]} ms ({best})"
        print(f"{rows} x {features}: floor {row['floor_ms']} ms;", "; ".join(f"{k} {v}" for k, v in summary.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
