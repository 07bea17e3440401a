"""flex_attention against PyTorch's variable-length flash attention (torch.nn.attention.varlen) on one packed row of
Belle-like samples (lognormal lengths, ~240 tokens), gemma-3-4b-it's heads (8 query, 4 key-value, 256 wide), full
causal and 1,024-token sliding layers: forward + backward time, first-call time, the largest difference from flex,
and whether varlen's step can be captured in a CUDA graph with the sample boundaries padded to a fixed count.
On a GPU: python bench/varlen_probe.py [tokens per row ...]"""

import inspect
import json
import sys
import time

import torch
import torch.nn.attention.varlen
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

H, KV, D, WINDOW = 8, 4, 256, 1024
GQA = (
    {"enable_gqa": True} if "enable_gqa" in inspect.signature(torch.nn.attention.varlen.varlen_attn).parameters else {}
)
MAX_SAMPLES = 256  # the fixed count the boundaries are padded to for a graph (zero-length samples at the end)


def belle_like_lengths(tokens: int) -> list[int]:
    torch.manual_seed(0)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(min(2000, max(20, torch.empty(1).log_normal_(5.4, 0.5).item()))))
    lengths[-1] -= sum(lengths) - tokens
    return lengths


def timed(step, repeats=10) -> float:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return round(1e3 * sorted(times)[len(times) // 2], 3)


def first_call(step, inputs) -> tuple:
    """One forward + backward from cleared gradients: its output, the inputs' gradients, and its seconds."""
    for t in inputs:
        t.grad = None
    started = time.time()
    out = step()
    torch.cuda.synchronize()
    return out, [t.grad.clone() for t in inputs], time.time() - started


def probe(tokens: int, capture: bool) -> dict:
    from torch.nn.attention import varlen

    lengths = belle_like_lengths(tokens)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).cuda()
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    padded = torch.full((MAX_SAMPLES + 1,), tokens, dtype=torch.int32, device="cuda")
    padded[: len(bounds)] = bounds
    q = torch.randn(tokens, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tokens, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, H, D, device="cuda", dtype=torch.bfloat16)
    compiled, longest = torch.compile(flex_attention), max(lengths)
    out = {"samples": len(lengths), "longest": max(lengths)}
    for layer, window in (("full", tokens), ("sliding", WINDOW)):
        window_t = torch.tensor(window, device="cuda")

        def rule(b, h, qi, kv, window_t=window_t):
            return (kv <= qi) & (kv > qi - window_t) & (doc[qi] == doc[kv])

        mask = torch.compile(create_block_mask)(rule, 1, None, tokens, tokens, device="cuda")

        def flex_step(mask=mask):
            o = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask,
                         enable_gqa=True, kernel_options={"bwd_num_warps": 8})  # fmt: skip
            o.backward(g.transpose(0, 1)[None])
            return o[0].transpose(0, 1)

        def varlen_step(cu=bounds, longest=longest, left=-1 if window >= tokens else window - 1):
            o = varlen.varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(left, 0), **GQA)
            o.backward(g)
            return o

        reference, grads_flex, first_flex = first_call(flex_step, (q, k, v))
        mine, grads_varlen, first_varlen = first_call(varlen_step, (q, k, v))
        row = {
            "first_call_s": {"flex": round(first_flex, 2), "varlen": round(first_varlen, 2)},
            "max_abs_diff": {
                "out": (mine - reference).abs().max().item(),
                **{n: (a - b).abs().max().item() for n, a, b in zip("qkv", grads_varlen, grads_flex)},
            },
            "fwd_bwd_ms": {
                "flex": timed(flex_step),
                "varlen": timed(varlen_step),
                "varlen_padded_static": timed(lambda: varlen_step(padded, tokens)),
            },
        }
        padded_out = varlen_step(padded, tokens)
        row["max_abs_diff"]["padded_vs_exact"] = (padded_out - mine).abs().max().item()
        out[layer] = row
    if not capture:
        return out
    try:  # capture forward + backward of the padded form in one graph
        for t in (q, k, v):
            t.grad = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                varlen.varlen_attn(q, k, v, padded, padded, tokens, tokens, window_size=(WINDOW - 1, 0),
                                   **GQA).backward(g)  # fmt: skip
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o = varlen.varlen_attn(q, k, v, padded, padded, tokens, tokens, window_size=(WINDOW - 1, 0),
                                   **GQA)  # fmt: skip
            o.backward(g)
        graph.replay()
        torch.cuda.synchronize()
        out["cuda_graph"] = "captured and replayed"
    except Exception as error:
        out["cuda_graph"] = f"failed: {str(error).splitlines()[0][:200]}"
    return out


if __name__ == "__main__":
    from torch.nn.attention import varlen

    print(torch.__version__, torch.cuda.get_device_name(), inspect.signature(varlen.varlen_attn), flush=True)
    for n in sys.argv[1:] or ["8192", "16384"]:
        print(n, json.dumps(probe(int(n), capture=n == (sys.argv[1:] or ["16384"])[-1])), flush=True)
