"""Time flex_attention forward and backward on one packed row of 32,768 tokens of Belle-like samples (lognormal
lengths, ~240 tokens), gemma-3-4b-it's heads (8 query, 4 key-value, 256 wide), per kernel option set.
On a GPU: python bench/flex_probe.py [option set names]"""

import json
import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

torch.manual_seed(0)
T, H, KV, D = 32768, 8, 4, 256
lengths = []
while sum(lengths) < T:
    lengths.append(int(min(2000, max(20, torch.empty(1).log_normal_(5.4, 0.5).item()))))
doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:T].cuda()


def mask(b, h, q, kv):
    return (doc[q] == doc[kv]) & (q >= kv)


block_mask = create_block_mask(mask, 1, 1, T, T, device="cuda", _compile=True)
q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)

OPTIONS = {
    "default": None,
    "bwd_64x64_w8": {"bwd_num_warps": 8},
    "bwd_32x64": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32},
    "bwd_32x64_s3": {
        "bwd_BLOCK_M1": 32,
        "bwd_BLOCK_N1": 64,
        "bwd_BLOCK_M2": 64,
        "bwd_BLOCK_N2": 32,
        "bwd_num_stages": 3,
    },
    "bwd_64x128_w8": {
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 128,
        "bwd_BLOCK_M2": 128,
        "bwd_BLOCK_N2": 64,
        "bwd_num_warps": 8,
        "bwd_num_stages": 1,
    },
    "bwd_s1": {"bwd_num_stages": 1},
    "fwd_64x64_w8": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2},
    "fwd_128x64_w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2},
}
names = sys.argv[1:] or list(OPTIONS)
results = {}
for name in names:
    options = OPTIONS[name]
    torch._dynamo.reset()  # each option set compiles anew instead of hitting the recompilation limit
    compiled = torch.compile(flex_attention)
    try:
        started = time.time()
        for _ in range(2):
            out = compiled(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options)
            out.backward(g)
        compile_s = time.time() - started
        torch.cuda.synchronize()
        fwd, both = [], []
        for _ in range(10):
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            compiled(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options).backward(g)
            torch.cuda.synchronize()
            fwd.append(t1 - t0)
            both.append(time.perf_counter() - t1)
        results[name] = {
            "fwd_ms": round(1e3 * sorted(fwd)[5], 3),
            "fwd_bwd_ms": round(1e3 * sorted(both)[5], 3),
            "compile_s": round(compile_s, 1),
        }
    except Exception as error:  # a config the card cannot run (shared memory): say so and go on
        import traceback

        traceback.print_exc(limit=4)
        results[name] = {"error": str(error).splitlines()[0][:200]}
    print(name, results[name], flush=True)
print(json.dumps({"samples": len(lengths), "sparsity": str(block_mask)[:200], "results": results}, indent=1))
