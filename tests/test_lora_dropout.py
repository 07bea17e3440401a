"""LoRA dropout drawn inside the kernels: the mask they draw, the products they compute with it, and the same mask
again in a recomputed forward pass. On a GPU the kernels are compiled and run in bf16. Without one they run in
Triton's interpreter, in fp32 (the interpreter mishandles bf16); the interpreter must be chosen before Triton is first
imported, so on CPU `test_kernels_under_triton_interpreter` runs this file again in a fresh process with it on."""

import os
import subprocess
import sys

import pytest
import torch

from gemma_sft import REPO_ROOT
from gemma_sft.patches import fused_qlora

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

P = 0.3


@pytest.fixture(scope="module")
def kernels():
    """(module, device, dtype, tolerance): compiled on a GPU, interpreted on CPU (in the fresh process below)."""
    if not torch.cuda.is_available() and not INTERPRETED:
        pytest.skip("without a GPU these run under test_kernels_under_triton_interpreter")
    from gemma_sft.patches import lora_dropout

    if torch.cuda.is_available():
        return lora_dropout, torch.device("cuda"), torch.bfloat16, 2e-2
    return lora_dropout, torch.device("cpu"), torch.float32, 1e-5


def test_kernels_under_triton_interpreter():
    if torch.cuda.is_available() or INTERPRETED:
        pytest.skip("the kernels run compiled on this GPU / this is the interpreted run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "6 passed, 1 skipped" in result.stdout, result.stdout[-500:]  # the six ran; skipped: this launcher


@pytest.mark.parametrize(("rows", "features", "rank"), [(300, 160, 8), (2100, 96, 16), (70, 200, 24)])
def test_kernels_compute_dropout_written_out(kernels, rows, features, rank):
    module, device, dtype, tolerance = kernels
    torch.manual_seed(0)
    x = torch.randn(rows, features, device=device, dtype=dtype)
    a = (torch.randn(rank, features, device=device) * 0.1).to(dtype)
    grad_down = torch.randn(rows, rank, device=device, dtype=dtype)
    seed = module.new_seed(device)
    keep = module.keep_mask(rows, features, P, seed)
    assert abs(keep.float().mean().item() - (1 - P)) < 0.02
    dropped = (
        x.float() * keep / (1 - module.effective_p(P))
    )  # what PEFT's dropout would hand the A projection, with this mask

    down = module.down(x, a, P, seed)
    assert down.dtype == dtype and down.shape == (rows, rank)
    torch.testing.assert_close(down.float(), dropped @ a.float().t(), atol=tolerance * 10, rtol=tolerance)
    grad_a = module.grad_a(grad_down, x, P, seed)
    torch.testing.assert_close(grad_a, grad_down.float().t() @ dropped, atol=tolerance * 100, rtol=tolerance)
    grad_x = module.grad_x(grad_down, a, P, seed)
    assert grad_x.dtype == dtype and grad_x.shape == (rows, features)
    expected_grad_x = (grad_down.float() @ a.float()) * keep / (1 - module.effective_p(P))
    torch.testing.assert_close(grad_x.float(), expected_grad_x, atol=tolerance * 10, rtol=tolerance)
    already = torch.randn(rows, features, device=device, dtype=dtype)  # what fp8_base_matmuls' product leaves there
    added = module.grad_x(grad_down, a, P, seed, into=already.clone())
    torch.testing.assert_close(added.float(), already.float() + expected_grad_x, atol=tolerance * 10, rtol=tolerance)


def test_each_seed_and_element_draws_its_own_keep(kernels):
    module, device, _, _ = kernels
    first, second = (module.keep_mask(64, 128, P, torch.tensor([s], device=device, dtype=torch.int32)) for s in (1, 2))
    assert not torch.equal(first, second)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[:, 0], first[:, 1])  # rows, columns differ
    assert torch.equal(module.keep_mask(64, 128, P, torch.tensor([1], device=device, dtype=torch.int32)), first)
    assert module.keep_mask(64, 128, 0.0, torch.tensor([1], device=device, dtype=torch.int32)).all()
    # one random draw serves 8 neighbours: each of the 8 positions is kept at the rate asked, independently of the next
    keep = module.keep_mask(512, 256, P, torch.tensor([3], device=device, dtype=torch.int32)).float()
    for position in range(8):
        assert abs(keep[:, position::8].mean().item() - (1 - P)) < 0.01, position
    assert abs((keep[:, :-1] * keep[:, 1:]).mean().item() - (1 - P) ** 2) < 0.01


def qlora_layer(out_features, in_features, device, dtype):
    """A 4-bit weight (packed, its quantization state, its dequantized value) and LoRA factors A, B of rank 16."""
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(out_features, in_features, device=device, dtype=dtype) * 0.05
    packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4")
    a = (torch.randn(16, in_features, device=device) * 0.1).to(dtype).requires_grad_()
    b = (torch.randn(out_features, 16, device=device) * 0.1).to(dtype).requires_grad_()
    return packed, state, bnb_functional.dequantize_4bit(packed, state).to(dtype), a, b


def test_layer_with_kernel_dropout_equals_the_adapter_on_dropped_input(kernels):
    """QLoRALinear with dropout in its kernels: x W^T + s (dropout(x) A^T) B^T and its gradients, for its mask."""
    module, device, dtype, tolerance = kernels
    torch.manual_seed(0)
    packed, state, weight, a, b = qlora_layer(48, 80, device, dtype)
    x = torch.randn(3, 37, 80, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, 37, 48, device=device, dtype=dtype)

    torch.manual_seed(7)
    out = fused_qlora.QLoRALinear.apply(x, x, packed, state, a, b, 2.0, dtype, P)
    out.backward(grad_out)
    torch.manual_seed(7)  # the seed QLoRALinear drew
    keep = module.keep_mask(3 * 37, 80, P, module.new_seed(device)).view(3, 37, 80)

    xs, as_, bs = (t.detach().float().requires_grad_() for t in (x, a, b))
    expected = xs @ weight.float().t() + 2.0 * ((xs * keep / (1 - module.effective_p(P))) @ as_.t()) @ bs.t()
    expected.backward(grad_out.float())
    torch.testing.assert_close(out.float(), expected, atol=tolerance * 10, rtol=tolerance)
    for name, got, want in (("x", x, xs), ("A", a, as_), ("B", b, bs)):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=tolerance * 10, rtol=tolerance, msg=name)


def test_recomputed_forward_pass_draws_the_same_mask(kernels):
    """Gradient checkpointing runs the forward pass again in backward: the gradients must be those of the mask the
    first pass used, as without checkpointing. Without restoring the generator's state they would not be."""
    from torch.utils.checkpoint import checkpoint

    _, device, dtype, tolerance = kernels
    torch.manual_seed(0)
    packed, state, _, a, b = qlora_layer(64, 64, device, dtype)
    x = torch.randn(2, 50, 64, device=device, dtype=dtype, requires_grad=True)

    def two_layers(inputs):
        hidden = fused_qlora.QLoRALinear.apply(inputs, inputs, packed, state, a, b, 2.0, dtype, P)
        return fused_qlora.QLoRALinear.apply(hidden, hidden, packed, state, a, b, 2.0, dtype, P)

    def gradients(run):
        torch.manual_seed(3)
        run(x).float().pow(2).sum().backward()
        found = [t.grad.clone() for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
        return found

    plain = gradients(two_layers)
    recomputed = gradients(lambda t: checkpoint(two_layers, t, use_reentrant=False))
    for got, want in zip(recomputed, plain):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    redrawn = gradients(lambda t: checkpoint(two_layers, t, use_reentrant=False, preserve_rng_state=False))
    assert not torch.allclose(redrawn[1], plain[1], atol=tolerance, rtol=tolerance)

    # the second layer keeping its output, adapter product and seed for the recomputation, as keep_mlp_outputs does
    store = {}

    def second_layer_kept(inputs):
        hidden = fused_qlora.QLoRALinear.apply(inputs, inputs, packed, state, a, b, 2.0, dtype, P)
        kept = store.pop("second") if "second" in store else store.setdefault("second", {})
        out = fused_qlora.QLoRALinear.apply(hidden, hidden, packed, state, a, b, 2.0, dtype, P, kept)
        kept.setdefault("out", out.detach())
        return out

    replayed = gradients(lambda t: checkpoint(second_layer_kept, t, use_reentrant=False))
    assert not store  # the recomputation took what the first pass kept
    for got, want in zip(replayed, plain):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
