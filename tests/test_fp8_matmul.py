"""The frozen weight's matmuls in FP8 (patches/fp8_matmul.py, switch fp8_base_matmuls): what is rounded and how far,
that _scaled_mm computes exactly the product of the rounded operands, and that the fused QLoRA layer and sft.py
learn nearly what they learn in full precision. On CPU torch's own FP8 kernels run; on an FP8 GPU, cuBLAS's."""

import pytest
import torch
from conftest import TINY_RECIPE_FLAGS, belle_rows, write_jsonl
from test_fused_qlora import DEMO, FOUR_BIT, four_bit_lora_model

from gemma_sft import config, patches, plan
from gemma_sft.patches import fp8_matmul, fused_qlora

FP8_GPU = torch.cuda.is_available() and fp8_matmul.supported(torch.device("cuda"))
# torch's CPU FP8 matmul takes a scale per row from 2.13 (requirements.txt pins it); older ones skip these
needs_cpu_fp8 = pytest.mark.skipif(
    not fp8_matmul.supported(torch.device("cpu")), reason="this torch's CPU FP8 matmul takes no row scales"
)


def _relative(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_rows_fill_the_upper_half_of_the_range_with_power_of_two_scales():
    torch.manual_seed(0)
    t = torch.randn(40, 96) * torch.logspace(-6, 3, 40).unsqueeze(1)  # rows nine decades apart
    t[7] = 0
    values, scale = fp8_matmul.rowwise(t)
    assert values.dtype == torch.float8_e4m3fn and values.is_contiguous() and scale.shape == (40, 1)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two: applying them is exact
    top = values.float().abs().amax(dim=1)
    nonzero = torch.arange(40) != 7
    assert ((top[nonzero] >= 224) & (top[nonzero] <= 448)).all()  # each row reaches half of e4m3's range, never beyond
    assert torch.equal(values[7].float(), torch.zeros(96))
    back = values.float() * scale
    # e4m3 keeps 3 bits of mantissa: each element within 1/16 of itself (or one step of the row's smallest normals)
    assert (back - t).abs().le(t.abs() / 16 + scale * 2**-6).all()
    assert not torch.equal(back, t)  # it did round
    # a transposed view comes back contiguous in its own shape, scaled per row of the view (a column of t)
    t_values, t_scale = fp8_matmul.rowwise(t[:8].t())
    assert t_values.shape == (96, 8) and t_values.is_contiguous() and t_scale.shape == (96, 1)


@needs_cpu_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_are_exact_on_the_rounded_operands(dtype):
    torch.manual_seed(1)
    x, weight = torch.randn(66, 128, dtype=dtype), (torch.randn(96, 128) * 0.02).to(dtype)
    grad = torch.randn(66, 96, dtype=dtype)

    def rounded(t):
        values, scale = fp8_matmul.rowwise(t)
        return values.float() * scale

    out = fp8_matmul.linear(x, weight)
    assert out.dtype == dtype and out.shape == (66, 96)
    torch.testing.assert_close(out.float(), (rounded(x) @ rounded(weight).t()).to(dtype).float(), atol=1e-3, rtol=1e-2)
    grad_in = fp8_matmul.input_grad(grad, weight)
    assert grad_in.shape == (66, 128)
    # the weight is scaled per input feature here: the columns of W, the rows of its transpose
    expected = rounded(grad) @ rounded(weight.t()).t()
    torch.testing.assert_close(grad_in.float(), expected.to(dtype).float(), atol=1e-3, rtol=1e-2)
    # against the exact products: a few percent off, never more (and not zero: FP8 was used)
    for got, exact in ((out, x.float() @ weight.float().t()), (grad_in, grad.float() @ weight.float())):
        assert 0.01 < _relative(got, exact) < 0.06


def test_shapes_and_devices_it_takes():
    x = torch.zeros(5, 64)
    assert fp8_matmul.fits(x, (32, 64)) and fp8_matmul.fits(x.bfloat16(), (32, 64))
    assert not fp8_matmul.fits(x, (40, 64)) and not fp8_matmul.fits(x[:, :60], (32, 60))  # widths of 16s only
    assert not fp8_matmul.fits(x.double(), (32, 64))
    assert not fp8_matmul.supported(torch.device("meta"))


@pytest.fixture
def fp8_on():
    fused_qlora.fp8_base_matmuls = True
    yield
    fused_qlora.fp8_base_matmuls = False
    patches.disable("fused_qlora")


def _layer_results(x, lora_x_of, packed, state, lora_a, lora_b, dtype, kernel_p=0.0):
    """Output and gradients (x, A, B) of one fused layer, without and with FP8."""
    results = []
    for fp8 in (False, True):
        fused_qlora.fp8_base_matmuls = fp8
        torch.manual_seed(1)  # the same dropout draw both times
        leaf = x.clone().requires_grad_()
        out = fused_qlora.QLoRALinear.apply(leaf, lora_x_of(leaf), packed, state, lora_a, lora_b, 2.0, dtype, kernel_p)
        out.float().pow(2).mean().backward()
        results.append([out.detach(), leaf.grad, lora_a.grad.clone(), lora_b.grad.clone()])
        lora_a.grad = lora_b.grad = None
    return results


@needs_cpu_fp8
@pytest.mark.parametrize("dropped_copy", [False, True])
def test_a_fused_layer_in_fp8_stays_within_fp8_rounding(fp8_on, dropped_copy):
    """One 4-bit LoRA layer in fp32 on CPU, its input shared with the adapter or a dropped copy (PEFT's dropout): the
    output and the three gradients within a few percent of the layer without FP8, and not equal to them."""
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    packed, state = bnb_functional.quantize_4bit(torch.randn(256, 128) * 0.02, quant_type="nf4",
                                                 compress_statistics=True)  # fmt: skip
    x = torch.randn(66, 128)
    lora_a, lora_b = (torch.randn(8, 128) * 0.02).requires_grad_(), (torch.randn(256, 8) * 0.02).requires_grad_()
    dropout = torch.nn.Dropout(0.1)
    lora_x_of = dropout if dropped_copy else (lambda leaf: leaf)
    exact, rounded = _layer_results(x, lora_x_of, packed, state, lora_a, lora_b, torch.float32)
    for name, want, got in zip(("out", "grad x", "grad A", "grad B"), exact, rounded, strict=True):
        assert 0 < _relative(got, want) < 0.06, name


@needs_cpu_fp8
def test_each_fused_layer_of_a_model_goes_through_fp8(tiny_model_dir, monkeypatch, fp8_on):
    """In a model every fused layer's forward product and input gradient take the FP8 path."""
    used = []
    for name in ("linear", "input_grad"):
        original = getattr(fp8_matmul, name)
        monkeypatch.setattr(fp8_matmul, name, lambda *a, _f=original, _n=name: used.append(_n) or _f(*a))
    model = four_bit_lora_model(tiny_model_dir, 0.1)
    patches.enable("fused_qlora")
    model(torch.randint(10, 1000, (2, 33))).logits.float().pow(2).mean().backward()
    # each LoRA layer's forward once; each input gradient but those of the first layer's q, k and v projections, whose
    # input (the frozen embedding's output) needs none
    assert used.count("linear") == 2 * 7 and used.count("input_grad") == 2 * 7 - 3


def _plan_for(flags, tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(4))
    recipe = config.parse([DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(rows), "--output_dir",
                           str(tmp_path / "out"), *TINY_RECIPE_FLAGS, *FOUR_BIT, *flags])  # fmt: skip
    return plan.settle_training(recipe.training, recipe.model, recipe.speed, [100])


@pytest.mark.skipif(
    not FP8_GPU and (torch.cuda.is_available() or not fp8_matmul.supported(torch.device("cpu"))),
    reason="no FP8 matmul with row scales on this machine",
)
def test_the_plan_says_whether_fp8_takes_effect(tmp_path, tiny_model_dir, monkeypatch):
    assert not _plan_for([], tmp_path, tiny_model_dir).fp8_matmuls  # off unless asked
    asked = _plan_for(["--fp8_base_matmuls", "true"], tmp_path, tiny_model_dir)
    assert asked.fp8_matmuls and "the frozen 4-bit weights' matmuls in FP8 (e4m3, a scale per row)" in asked.decisions
    without_fused = _plan_for(["--fp8_base_matmuls", "true", "--fused_qlora", "false"], tmp_path, tiny_model_dir)
    assert not without_fused.fp8_matmuls
    assert any("fused_qlora, which this run does not use" in line for line in without_fused.decisions)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an Ampere card: bf16 as before, and said so
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert plan._fp8_here(["fused_qlora"]) == (
        False, "this GPU (compute capability 8.6) has no FP8 matmuls (8.9 or later needed)"
    )  # fmt: skip
    assert not fp8_matmul.fits(torch.zeros(4, 64, device="meta"), (32, 64))


@needs_cpu_fp8
@pytest.mark.train
def test_sft_in_fp8_learns_nearly_the_same_adapter(tmp_path, tiny_model_dir, fp8_on):
    """sft.py with --fp8_base_matmuls true: the same five losses within 1%, an adapter near the one learned in full
    precision (a broken FP8 backward would put it as far away as the adapter itself), and the plan saved with the
    run says FP8 was used."""
    import json

    from safetensors.torch import load_file

    from sft import main as sft_main

    data = write_jsonl(tmp_path / "rows.jsonl", belle_rows(16))
    adapters, losses = [], []
    for fp8 in ("false", "true"):
        out = tmp_path / f"out-{fp8}"
        args = [DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
                *TINY_RECIPE_FLAGS, *FOUR_BIT, "--max_length", "128", "--eval_samples", "0", "--lora_dropout", "0",
                "--gradient_checkpointing", "true", "--fp8_base_matmuls", fp8]  # fmt: skip
        assert sft_main(args) == 0
        assert json.loads((out / "plan.json").read_text())["fp8_matmuls"] == (fp8 == "true")
        adapters.append(load_file(str(out / "adapter_model.safetensors")))
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses.append([entry["loss"] for entry in history if "loss" in entry])
    assert len(losses[0]) == 5 and losses[0][-1] < losses[0][0]
    torch.testing.assert_close(losses[1], losses[0], atol=0, rtol=0.01)
    assert losses[1] != losses[0]  # FP8 did round
    for name, tensor in adapters[0].items():
        # B starts at zero and Adam's first steps move each element by about the learning rate whatever its gradient's
        # size, so B takes FP8's rounding of small gradients at full size; A moves little from its random start
        assert _relative(adapters[1][name], tensor) < (0.4 if "lora_B" in name else 0.1), name


@pytest.mark.skipif(not FP8_GPU, reason="needs a GPU with FP8 matmuls (compute capability 8.9+)")
def test_on_a_gpu_fp8_layers_at_the_4b_widths_stay_close(fp8_on):
    """cuBLAS's FP8 products at gemma-3-4b's widths, a token count that is no multiple of 16, bf16, dropout in the
    kernels: the layer's output and all three gradients within a few percent of the bf16 layer's."""
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    device = torch.device("cuda")
    weight = torch.randn(10240, 2560, device=device, dtype=torch.bfloat16) * 0.02
    packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    x = torch.randn(1000, 2560, device=device, dtype=torch.bfloat16)
    lora_a = (torch.randn(16, 2560, device=device) * 0.02).bfloat16().requires_grad_()
    lora_b = (torch.randn(10240, 16, device=device) * 0.02).bfloat16().requires_grad_()
    results = _layer_results(x, lambda leaf: leaf, packed, state, lora_a, lora_b, torch.bfloat16, kernel_p=0.1)
    for name, exact, rounded in zip(("out", "grad x", "grad A", "grad B"), *results, strict=True):
        assert 0 < _relative(rounded, exact) < 0.06, name
