"""The attention changes made for speed leave the arithmetic alone: norms in the stored layout give the same outputs
and gradients, and flex_attention gets the measured kernel options only where they were measured."""

import pytest
import torch
from conftest import tiny_text_config

from gemma_sft import patches
from gemma_sft.patches import attention


def test_norms_in_stored_layout_give_the_same_outputs_and_gradients():
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(tiny_text_config(num_attention_heads=4, num_key_value_heads=2)).train()
    for module in model.modules():  # random norm weights, so a norm applied along the wrong axis would show
        if module.__class__.__name__ == "Gemma3RMSNorm":
            torch.nn.init.normal_(module.weight, std=0.5)
    ids = torch.randint(10, 1000, (2, 21))
    norm_inputs = []
    for name, module in model.named_modules():
        if name.endswith(("q_norm", "k_norm")):
            module.register_forward_pre_hook(lambda _, args: norm_inputs.append(args[0].is_contiguous()))

    def run():
        norm_inputs.clear()
        logits = model(ids).logits
        logits.pow(2).mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return logits.detach(), grads, list(norm_inputs)

    plain_logits, plain_grads, plain_inputs = run()
    assert attention.qk_norm_in_stored_layout(model) == 2 * 2  # q and k norms of both layers
    logits, grads, _ = run()
    assert not any(plain_inputs) and len(plain_inputs) == 4  # Gemma 3 hands them strided views
    torch.testing.assert_close(logits, plain_logits, atol=1e-6, rtol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert attention.qk_norm_in_stored_layout(model) == 4  # idempotent: not wrapped twice
    # what the wrapped norm hands the norm itself: the stored layout, contiguous
    norm, seen = model.model.layers[0].self_attn.q_norm, []
    plain_norm = type(norm)(32)
    torch.nn.init.normal_(plain_norm.weight)
    wrapped = attention.in_stored_layout(lambda x: seen.append(x.is_contiguous()) or plain_norm(x))
    strided = torch.randn(1, 5, 4, 32).transpose(1, 2)
    torch.testing.assert_close(wrapped(strided), plain_norm(strided))
    assert seen == [True]


@pytest.fixture
def recorded_flex_calls(monkeypatch):
    from transformers.integrations import flex_attention as flex
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    calls = []
    original = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    monkeypatch.setattr(flex, "flex_attention_forward", lambda *args, **kwargs: calls.append(kwargs))
    patches.enable("tuned_flex_attention")
    yield calls, ALL_ATTENTION_FUNCTIONS["flex_attention"]
    AttentionInterface.register("flex_attention", original)


class FakeCudaQuery:
    is_cuda, device, shape = True, "cuda:0", (1, 8, 16, 256)


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), {"bwd_num_warps": 8}), ((8, 0), None)])
def test_flex_attention_gets_the_measured_options_on_the_measured_cards(
    monkeypatch, recorded_flex_calls, capability, expected
):
    calls, tuned = recorded_flex_calls
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    tuned(None, FakeCudaQuery(), None, None, None, scaling=0.1)
    tuned(None, FakeCudaQuery(), None, None, None, kernel_options={"BLOCK_M": 32})  # the caller's own stay
    tuned(None, torch.zeros(1, 8, 16, 256), None, None, None)  # CPU: untouched
    assert [call.get("kernel_options") for call in calls] == [expected, {"BLOCK_M": 32}, None]
    assert calls[0]["scaling"] == 0.1


def test_sdpa_training_on_a_gpu_turns_cudnn_attention_off(monkeypatch):
    """cuDNN's attention backward returns NaN gradients for some padded batches (attention.avoid_cudnn_attention):
    training with sdpa on a GPU turns that kernel off; flex_attention and the CPU leave the setting alone."""
    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not attention.avoid_cudnn_attention("flex_attention") and calls == []
    assert attention.avoid_cudnn_attention("sdpa") and calls == [False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not attention.avoid_cudnn_attention("sdpa") and calls == [False]
