"""Time the output head's forward + backward for one step's supervised tokens of gemma-3-4b-it (2,560 wide, 262,208
words, bf16): TRL's chunked head against patches/output_head.py, per tile size and row-kernel setting; peak memory
above the inputs. On a GPU: python bench/head_probe.py [tokens]"""

import json
import sys
import time
from pathlib import Path

import torch
from trl.kernels import ChunkedLogProbFunction

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gemma_sft.patches import output_head

TOKENS = int(sys.argv[1]) if len(sys.argv) > 1 else 22000
WIDTH, VOCAB = 2560, 262208
torch.manual_seed(0)
hidden = (torch.randn(TOKENS, WIDTH, device="cuda") / 8).bfloat16().requires_grad_()
weight = (torch.randn(VOCAB, WIDTH, device="cuda") / 8).bfloat16()
labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
OUTPUTS = ("log_probs", "entropy", "is_top1")


def trl_head():
    return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, OUTPUTS)


def our_head():
    return output_head.LogProbsWithForwardGradient.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, OUTPUTS)


def timed(head, repeats=5):
    """Median milliseconds of forward, of backward, and the peak memory above the inputs (GiB)."""
    forward, backward = [], []
    for _ in range(repeats + 1):
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        log_probs = head()[0]
        torch.cuda.synchronize()
        middle = time.perf_counter()
        (-log_probs.sum() / TOKENS).backward()
        torch.cuda.synchronize()
        forward.append(1000 * (middle - started))
        backward.append(1000 * (time.perf_counter() - middle))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return sorted(forward[1:])[repeats // 2], sorted(backward[1:])[repeats // 2], peak, log_probs.detach(), hidden.grad


reference = timed(trl_head)
results = {"trl": reference[:3]}
settings = [(tile, block, warps) for tile in (1, 2) for block, warps in ((4096, 8), (8192, 16), (2048, 4))]
settings += [(0.5, 4096, 8), (4, 4096, 8)]
for tile, block, warps in settings:
    output_head.TILE_BYTES, output_head.ROW_BLOCK, output_head.ROW_WARPS = int(tile * 2**30), block, warps
    forward_ms, backward_ms, peak, log_probs, grad = timed(our_head)
    assert torch.allclose(log_probs, reference[3], atol=0.05), (log_probs - reference[3]).abs().max()
    assert torch.allclose(grad.float(), reference[4].float(), atol=1e-6, rtol=0.05)
    results[f"tile {tile} GiB, block {block}, {warps} warps"] = (forward_ms, backward_ms, peak)
print(f"{TOKENS} tokens on {torch.cuda.get_device_name()}")
print("| head | forward ms | backward ms | total ms | peak GiB above inputs |\n|---|---|---|---|---|")
for name, (forward_ms, backward_ms, peak) in results.items():
    print(f"| {name} | {forward_ms:.1f} | {backward_ms:.1f} | {forward_ms + backward_ms:.1f} | {peak:.2f} |")
print(json.dumps({name: [round(v, 2) for v in values] for name, values in results.items()}))
