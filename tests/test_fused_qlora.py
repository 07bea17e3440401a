"""The fused QLoRA layer computes what PEFT computes: same outputs, same gradients, same trained adapter."""

import functools

import pytest
import torch
from conftest import TINY_RECIPE_FLAGS, belle_rows, write_jsonl

from gemma_sft import patches
from gemma_sft.patches import fused_qlora

DEMO = "recipes/gemma3_270m_belle_demo.yaml"
FOUR_BIT = ["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant", "true"]


@pytest.fixture
def count_fused_calls(monkeypatch):
    calls = []
    forward = fused_qlora.QLoRALinear.forward

    def counted(*args):
        calls.append((args[1].shape, "replayed" if args[10:] and args[10] and "out" in args[10] else "computed"))
        return forward(*args)

    monkeypatch.setattr(fused_qlora.QLoRALinear, "forward", staticmethod(counted))
    yield calls
    patches.disable("fused_qlora")


def four_bit_lora_model(model_dir, dropout):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=quant)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would hide half of the adapter's gradient
            torch.nn.init.normal_(param, std=0.02)
    return model.train()


def token_ids(model, *shape):
    """Random token ids on the model's device (bitsandbytes places a 4-bit model on the GPU where there is one)."""
    return torch.randint(10, 1000, shape, device=next(model.parameters()).device)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_layers_give_peft_outputs_and_gradients(tiny_model_dir, count_fused_calls, dropout, monkeypatch):
    # PEFT's dropout module on both sides, so that both draw the same masks (on a GPU the fused layer would draw its
    # own in the kernels: tests/test_lora_dropout.py checks those)
    monkeypatch.setattr(fused_qlora, "dropout_in_kernels", False)
    model = four_bit_lora_model(tiny_model_dir, dropout)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    ids = token_ids(model, 2, 33)
    results = []
    for fused in (False, True):
        patches.enable("fused_qlora") if fused else patches.disable("fused_qlora")
        torch.manual_seed(1)  # the same dropout masks both times
        logits = model(ids).logits
        (logits.float().pow(2).mean()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        results.append((logits.detach(), grads))
    assert len(count_fused_calls) == len(layers) == 2 * 7  # every LoRA layer of both decoder layers, once
    (peft_logits, peft_grads), (fused_logits, fused_grads) = results
    assert peft_grads.keys() == fused_grads.keys() and len(peft_grads) == 2 * len(layers)
    torch.testing.assert_close(fused_logits, peft_logits, atol=1e-5, rtol=1e-5)
    for name, grad in peft_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_cases_it_does_not_cover_keep_peft_forward(tiny_model_dir, count_fused_calls):
    model = four_bit_lora_model(tiny_model_dir, 0.0)
    ids = token_ids(model, 1, 9)
    patches.enable("fused_qlora")
    with torch.no_grad():
        with model.disable_adapter():  # the base model alone
            base = model(ids).logits
        assert not count_fused_calls
        patches.disable("fused_qlora")
        expected = model(ids).logits
        patches.enable("fused_qlora")
        assert not torch.allclose(base, expected)  # the adapter changes the output, so the check below means something
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert count_fused_calls
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A"))
    x = torch.zeros(1, 3, layer.in_features, device=ids.device)
    assert fused_qlora.covers(layer, x, (), {})
    assert not fused_qlora.covers(layer, x.double(), (), {})  # not the dtype the layer computes in
    assert not fused_qlora.covers(layer, x, (), {"adapter_names": ["default"]})  # mixed-adapter batches


KEPT = {  # what each marking keeps: the projections marked in a decoder layer, how many replay per layer
    "mlp": ([fused_qlora.keep_mlp_outputs], {"down_proj"}),
    "qkv": ([fused_qlora.keep_qkv_outputs], {"q_proj", "k_proj", "v_proj"}),
    "both": (
        [fused_qlora.keep_mlp_outputs, fused_qlora.keep_qkv_outputs],
        {"down_proj", "q_proj", "k_proj", "v_proj"},
    ),
}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("kept", sorted(KEPT))
def test_kept_outputs_give_the_gradients_of_full_recomputation(tiny_model_dir, count_fused_calls, dropout, kept):
    """Under gradient checkpointing the marked projections (the MLP's down projection; the attention's query, key and
    value projections) hand their first-pass output to the recomputation instead of computing it again, and every
    gradient stays what full recomputation gives."""
    marks, projections = KEPT[kept]
    model = four_bit_lora_model(tiny_model_dir, dropout)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patches.enable("fused_qlora")
    ids = token_ids(model, 2, 33)
    results = []
    for keep in (False, True):
        if keep:
            assert all(mark(model) == 2 for mark in marks)  # both decoder layers
            marked = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if getattr(m, "keep_output", 0)}
            assert marked == projections
        count_fused_calls.clear()
        torch.manual_seed(1)
        loss = model(ids).logits.float().pow(2).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad()
        replayed = [shape for shape, how in count_fused_calls if how == "replayed"]
        # each LoRA layer runs twice (forward, recomputation); a marked projection's second run takes its kept output
        # (the down projection's input is the MLP's intermediate width, 128; the others' the hidden size, 64)
        assert len(count_fused_calls) == 2 * 2 * 7
        assert len(replayed) == (2 * len(projections) if keep else 0), replayed
        assert sum(shape[-1] == 128 for shape in replayed) == (2 if keep and "down_proj" in projections else 0)
    (full_loss, full_grads), (kept_loss, kept_grads) = results
    assert torch.equal(kept_loss, full_loss) and kept_grads.keys() == full_grads.keys() and len(full_grads) == 28
    for name, grad in full_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(kept_grads[name], grad, atol=0, rtol=0, msg=name)
    # the wrapped checkpoint function is not wrapped twice
    assert all(mark(model) == 2 for mark in marks)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) and hasattr(m, "self_attn")]
    assert len(layers) == 2 and all(isinstance(m._gradient_checkpointing_func, functools.partial) for m in layers)
    assert not any(isinstance(m._gradient_checkpointing_func.func, functools.partial) for m in layers)


@pytest.mark.train
def test_training_with_fused_layers_learns_peft_adapter(tmp_path, tiny_model_dir, count_fused_calls):
    """sft.py routes every QLoRA layer through the fused function and learns PEFT's adapter. (TRL keeps QLoRA adapters
    in bf16, so their matmuls round differently by a hair: hence the bf16-sized tolerance.) With keep_qkv_outputs
    the query, key and value projections replay too, and the run learns exactly the same."""
    import json

    from safetensors.torch import load_file

    from sft import main as sft_main

    data = write_jsonl(tmp_path / "rows.jsonl", belle_rows(16))
    adapters, losses = [], []
    # (fused_qlora, keep_qkv_outputs, projections replayed of a layer's seven: the down projection's by default)
    for fused, keep_qkv, replaying in (("false", "false", 0), ("true", "false", 1), ("true", "true", 4)):
        out = tmp_path / f"out-{fused}-{keep_qkv}"
        count_fused_calls.clear()
        args = [DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
                *TINY_RECIPE_FLAGS, *FOUR_BIT, "--max_length", "128", "--eval_samples", "0", "--lora_dropout", "0",
                "--fused_qlora", fused, "--gradient_checkpointing", "true",
                "--keep_qkv_outputs", keep_qkv]  # fmt: skip
        assert sft_main(args) == 0
        assert bool(count_fused_calls) == (fused == "true")  # every forward of a QLoRA layer went through it
        assert len(count_fused_calls) % (2 * 7) == 0
        replayed = sum(how == "replayed" for _, how in count_fused_calls)
        assert replayed == len(count_fused_calls) // 14 * replaying
        adapters.append(load_file(str(out / "adapter_model.safetensors")))
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses.append([entry["loss"] for entry in history if "loss" in entry])
    assert len(losses[0]) == 5 and losses[0][-1] < losses[0][0]
    assert losses[2] == losses[1]
    assert adapters[2].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[2][name], tensor) for name, tensor in adapters[1].items())
    torch.testing.assert_close(losses[1], losses[0], atol=2e-4, rtol=0)
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 2 * 2 * 7
    for name, tensor in adapters[0].items():
        relative = (adapters[1][name].float() - tensor.float()).norm() / tensor.float().norm()
        assert relative < 0.02, (name, relative)
