"""Checkpointed layer inputs offloaded to host memory (patches/offload_activations.py): the host holds exactly each
layer's input, gradients are those of keeping them on the device, and on a GPU the peak memory falls by about the
bytes moved while training (graphs or not) learns the same adapter."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from test_cuda_graphs import GPU, loss_and_grads, padded_batch, tiny_lora_model, train_both_ways
from test_fused_qlora import four_bit_lora_model

from gemma_sft import hardware, patches
from gemma_sft.patches import cuda_graphs, fused_qlora
from gemma_sft.patches.offload_activations import offload_layer_inputs


def test_offloading_applies_on_a_gpu_with_non_reentrant_checkpointing(monkeypatch):
    def applies(gpu=True, checkpointing=True, reentrant=None, compiled=False, sharded=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(hardware, "sharded_launch", lambda: sharded)
        kwargs = None if reentrant is None else {"use_reentrant": reentrant}
        args = SimpleNamespace(gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=kwargs,
                               torch_compile=compiled)  # fmt: skip
        return patches.BY_SWITCH["offload_activations"].applies(None, args, None)

    assert applies() and applies(reentrant=False)
    assert not applies(gpu=False)
    assert not applies(checkpointing=False)  # nothing saved per layer to move
    assert not applies(reentrant=True)  # reentrant checkpointing keeps its inputs outside autograd's hooks
    assert not applies(compiled=True)
    assert not applies(sharded=True)  # FSDP and ZeRO-3 wrap the layers their own way


def _text_model(model):
    return model.base_model.model.model


def _host_copy(offload, key, like):
    return offload.buffers[key][: like.numel() * like.element_size()].view(like.dtype).view(like.shape)


def _loss_and_grads_on(model, ids):
    torch.manual_seed(1)
    loss = model(ids).logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def _count_replays(monkeypatch) -> list:
    """From now on, one entry per call of the fused layer's forward: whether it replayed a kept output."""
    replays, original = [], fused_qlora.QLoRALinear.forward

    def counted(*args):
        replays.append("out" in (args[10] or {}))
        return original(*args)

    monkeypatch.setattr(fused_qlora.QLoRALinear, "forward", staticmethod(counted))
    return replays


def _body_peak(model, tokens: int) -> int:
    """Peak GPU memory of the decoder stack's forward and backward on one row of `tokens` tokens, above the start."""
    ids = torch.randint(3, 1000, (1, tokens), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _text_model(model)(input_ids=ids).last_hidden_state.float().square().mean().backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - before


def _eager_and_graphed_steps_give(model, batch, expected_loss, expected_grads) -> None:
    """Two eager steps, then the graphs captured and two replayed steps: each gives the expected loss and gradients."""
    for graphed in (False, True):
        if graphed:
            assert cuda_graphs.graph_text_models(model) == 1
            loss_and_grads(model, *batch, seed=3)  # captures
        for _ in range(2):
            loss, grads = loss_and_grads(model, *batch, seed=7)
            torch.testing.assert_close(loss, expected_loss, rtol=1e-3, atol=1e-4)
            for name in expected_grads:
                torch.testing.assert_close(grads[name], expected_grads[name], rtol=2e-2, atol=1e-3)


def _layer_inputs(model):
    """Record each decoder layer's input as the forward pass hands it over: a copy, and a weak reference to it."""
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0].detach().clone(), weakref.ref(args[0])))

    for layer in _text_model(model).layers:
        layer.register_forward_pre_hook(record, with_kwargs=True)
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_host_holds_each_layer_input_and_gradients_are_unchanged(tiny_model_dir, dropout):
    model = tiny_lora_model(tiny_model_dir, "cpu", dropout=dropout, four_bit=False)
    batch = padded_batch("cpu")
    loss, grads = loss_and_grads(model, *batch, seed=0)
    assert offload_layer_inputs(model) == 2 and offload_layer_inputs(model) == 2  # wrapped once
    inputs = _layer_inputs(model)
    offload = _text_model(model).activation_offload
    offloaded_loss, offloaded_grads = loss_and_grads(model, *batch, seed=0)
    assert offload.offloaded == 2 and not offload.in_flight and sorted(offload.buffers) == [(0, 0), (1, 0)]
    for layer, (layer_input, _) in enumerate(inputs[:2]):
        # the host holds the layer's input, not another tensor the checkpoint saved
        assert torch.equal(_host_copy(offload, (layer, 0), layer_input), layer_input)
    assert offloaded_loss == loss and offloaded_grads.keys() == grads.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(offloaded_grads[name], grads[name], rtol=0, atol=0)


@pytest.fixture(scope="module")
def eight_layer_model_dir(tmp_path_factory, tiny_model_dir):
    from conftest import tiny_text_config
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    config = tiny_text_config(num_hidden_layers=8, layer_types=["sliding_attention", "full_attention"] * 4)
    path = tmp_path_factory.mktemp("eight-layers")
    Gemma3ForCausalLM(config).save_pretrained(path)
    return path


def test_offloaded_inputs_are_let_go_after_the_forward_pass(eight_layer_model_dir):
    """What offloading is for: once the forward pass is over, nothing holds the layer inputs it moved (the first
    layer's, the embedding output, is the model's own business); without offloading autograd holds them all."""
    model = tiny_lora_model(eight_layer_model_dir, "cpu", dropout=0.0, four_bit=False)
    batch = padded_batch("cpu")
    alive = []
    for offloading in (False, True):
        if offloading:
            assert offload_layer_inputs(model) == 8
        inputs = _layer_inputs(model)
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
        gc.collect()
        alive.append([reference() is not None for _, reference in inputs[:8]])
        logits.float().mean().backward()  # and the backward pass still finds them
        for layer in _text_model(model).layers:
            layer._forward_pre_hooks.clear()
    assert alive == [[True] * 8, [True] + [False] * 7]


def test_two_forward_passes_before_one_backward_keep_their_own_inputs(tiny_model_dir):
    """Two losses, one backward: the second forward pass writes another set of host buffers instead of overwriting
    the inputs the first one's backward pass still needs; the gradients are those of keeping everything."""
    model = tiny_lora_model(tiny_model_dir, "cpu", dropout=0.0, four_bit=False)
    first, mask = padded_batch("cpu")
    second = torch.flip(first, dims=[1])

    def two_losses():
        model.zero_grad(set_to_none=True)
        losses = [model(input_ids=ids, attention_mask=mask).logits.float().square().mean() for ids in (first, second)]
        sum(losses).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kept = two_losses()
    assert offload_layer_inputs(model) == 2
    offloaded = two_losses()
    assert sorted(_text_model(model).activation_offload.buffers) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert offloaded.keys() == kept.keys() and len(kept) == 28
    for name in kept:
        torch.testing.assert_close(offloaded[name], kept[name], rtol=0, atol=0)
    offloaded_again = two_losses()  # both passes were taken back: the same two sets serve again
    assert len(_text_model(model).activation_offload.buffers) == 4
    for name in kept:
        torch.testing.assert_close(offloaded_again[name], kept[name], rtol=0, atol=0)


def test_offloading_wraps_the_checkpoint_that_keeps_mlp_outputs(tiny_model_dir, monkeypatch):
    """With keep_mlp_outputs (fused 4-bit layers), the down projections still replay their kept outputs, the inputs
    still go to the host, and the gradients are those of full recomputation."""
    model = four_bit_lora_model(tiny_model_dir, 0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patches.enable("fused_qlora")
    ids = torch.randint(10, 1000, (2, 33), device=model.device)  # bitsandbytes puts the 4-bit model on a GPU if any

    try:
        full_loss, full_grads = _loss_and_grads_on(model, ids)
        assert fused_qlora.keep_mlp_outputs(model) == 2 and offload_layer_inputs(model) == 2
        replays = _count_replays(monkeypatch)
        loss, grads = _loss_and_grads_on(model, ids)
    finally:
        patches.disable("fused_qlora")
    assert sum(replays) == 2  # one kept output handed back per decoder layer
    assert _text_model(model).activation_offload.offloaded == 2
    assert loss == full_loss and grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=0, atol=0)


def test_kept_mlp_outputs_wait_on_the_host_and_come_back_for_the_recomputation(tiny_model_dir, monkeypatch):
    """offload_kept_outputs: the host holds exactly each down projection's kept output, the recomputation gets it back
    in place of computing it, and the gradients are still those of full recomputation."""
    from gemma_sft.patches import offload_activations

    model = four_bit_lora_model(tiny_model_dir, 0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patches.enable("fused_qlora")
    monkeypatch.setattr(offload_activations, "kept_outputs_too", True)
    replays, first_pass = [], []
    original = fused_qlora.QLoRALinear.forward
    ids = torch.randint(10, 1000, (2, 33), device=model.device)
    downs = [layer.mlp.down_proj for layer in _text_model(model).layers]

    def record(module, args, output):
        if torch.is_grad_enabled() and len(first_pass) < len(downs):  # the first pass comes before any recomputation
            first_pass.append(output.detach().clone())

    try:
        full_loss, full_grads = _loss_and_grads_on(model, ids)
        assert fused_qlora.keep_mlp_outputs(model) == 2 and offload_layer_inputs(model) == 2
        for down in downs:
            down.register_forward_hook(record)
        counted = staticmethod(lambda *args: replays.append(args[10] or {}) or original(*args))
        fused_qlora.QLoRALinear.forward = counted
        loss, grads = _loss_and_grads_on(model, ids)
    finally:
        fused_qlora.QLoRALinear.forward = original
        patches.disable("fused_qlora")
    offload = _text_model(model).activation_offload
    assert offload.offloaded == 2 and offload.kept_offloaded == 2
    handed_back = [kept["out"] for kept in replays if "out" in kept]
    assert len(handed_back) == 2 and all(isinstance(out, torch.Tensor) for out in handed_back)
    for position, output in enumerate(first_pass):
        host = _host_copy(offload, ("kept", position, 0, 0), output.reshape(-1, output.shape[-1]))
        assert torch.equal(host, output.reshape(host.shape).cpu())  # exactly the first pass's output
    for out, output in zip(reversed(handed_back), first_pass):  # the backward pass meets the last layer first
        assert torch.equal(out, output)
    assert loss == full_loss and grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=0, atol=0)


def test_kept_query_key_value_outputs_wait_on_the_host_beside_the_mlp_output(tiny_model_dir, monkeypatch):
    """keep_qkv_outputs with offload_kept_outputs: each layer sends its four kept outputs to host buffers of their
    own, in the order the layer computes them (query, key, value, then the MLP's), each exactly its first-pass value;
    the recomputation replays all four and the gradients are those of full recomputation."""
    from gemma_sft.patches import offload_activations

    model = four_bit_lora_model(tiny_model_dir, 0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patches.enable("fused_qlora")
    monkeypatch.setattr(offload_activations, "kept_outputs_too", True)
    first_pass = {}
    ids = torch.randint(10, 1000, (2, 33), device=model.device)
    layers = _text_model(model).layers
    kept_in_order = [[layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.down_proj]
                     for layer in layers]  # fmt: skip

    def record(module, args, output):
        if torch.is_grad_enabled() and module not in first_pass:  # the first pass comes before any recomputation
            first_pass[module] = output.detach().clone()

    try:
        full_loss, full_grads = _loss_and_grads_on(model, ids)
        assert fused_qlora.keep_mlp_outputs(model) == 2 and fused_qlora.keep_qkv_outputs(model) == 2
        assert offload_layer_inputs(model) == 2
        for projection in (p for projections in kept_in_order for p in projections):
            projection.register_forward_hook(record)
        replays = _count_replays(monkeypatch)
        loss, grads = _loss_and_grads_on(model, ids)
    finally:
        patches.disable("fused_qlora")
    offload = _text_model(model).activation_offload
    assert offload.offloaded == 2 and offload.kept_offloaded == 8 and sum(replays) == 8
    for position, projections in enumerate(kept_in_order):
        for index, projection in enumerate(projections):
            output = first_pass[projection]
            host = _host_copy(offload, ("kept", position, index, 0), output.reshape(-1, output.shape[-1]))
            assert torch.equal(host, output.reshape(host.shape).cpu()), (position, index)
    assert loss == full_loss and grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=0, atol=0)


@GPU
def test_on_a_gpu_offloading_lowers_peak_memory_and_replays_the_same_steps(eight_layer_model_dir):
    """Eager and through CUDA graphs, offloaded steps give the eager steps' loss and gradients, dropout included; on
    a long batch the body's peak memory falls by at least half of the layer inputs no longer held."""
    patches.enable("fused_qlora")
    model = tiny_lora_model(eight_layer_model_dir, "cuda", dropout=0.3, four_bit=True)
    batch = padded_batch("cuda")
    eager_loss, eager_grads = loss_and_grads(model, *batch, seed=7)

    layers = len(_text_model(model).layers)
    tokens = 65536
    kept = _body_peak(model, tokens)
    assert offload_layer_inputs(model) == layers
    offloaded = _body_peak(model, tokens)
    layer_input = tokens * model.config.hidden_size * 2  # bf16
    assert kept - offloaded >= 0.5 * (layers - 1) * layer_input, (kept, offloaded, layer_input)

    _eager_and_graphed_steps_give(model, batch, eager_loss, eager_grads)
    stack = _text_model(model).forward
    assert stack.failed is None and stack.replays == 3  # the capturing call replays too


def _gpu_model_keeping_mlp_outputs_offloaded(model_dir):
    """An eight-layer 4-bit LoRA model on the GPU (dropout in the kernels) whose layers keep their MLP outputs and
    offload their inputs; with its layer count and a padded batch."""
    patches.enable("fused_qlora")
    model = tiny_lora_model(model_dir, "cuda", dropout=0.3, four_bit=True)
    layers = len(_text_model(model).layers)
    assert fused_qlora.keep_mlp_outputs(model) == layers and offload_layer_inputs(model) == layers
    return model, layers, padded_batch("cuda")


@GPU
def test_on_a_gpu_kept_outputs_on_the_host_lower_peak_memory_and_replay_the_same_steps(eight_layer_model_dir,
                                                                                     monkeypatch):  # fmt: skip
    """offload_kept_outputs on top of the offloaded inputs: the body's peak falls by at least half of the kept MLP
    outputs, and eager and graphed steps give the steps without it."""
    from gemma_sft.patches import offload_activations

    model, layers, batch = _gpu_model_keeping_mlp_outputs_offloaded(eight_layer_model_dir)
    inputs_only_loss, inputs_only_grads = loss_and_grads(model, *batch, seed=7)

    tokens = 65536
    inputs_only = _body_peak(model, tokens)
    monkeypatch.setattr(offload_activations, "kept_outputs_too", True)
    both = _body_peak(model, tokens)
    assert _text_model(model).activation_offload.kept_offloaded >= layers
    kept_output = tokens * model.config.hidden_size * 2  # bf16
    assert inputs_only - both >= 0.5 * (layers - 1) * kept_output, (inputs_only, both, kept_output)

    _eager_and_graphed_steps_give(model, batch, inputs_only_loss, inputs_only_grads)
    assert _text_model(model).forward.failed is None


@GPU
@pytest.mark.parametrize("offloaded", [False, True])
def test_on_a_gpu_kept_query_key_value_outputs_replay_the_same_steps(eight_layer_model_dir, monkeypatch, offloaded):
    """keep_qkv_outputs on a GPU, with the dropout kernels' seeds replayed, on the GPU or with the kept outputs on the
    host: eager and graphed steps give the steps without it, and every layer's four kept outputs are used."""
    from gemma_sft.patches import offload_activations

    model, layers, batch = _gpu_model_keeping_mlp_outputs_offloaded(eight_layer_model_dir)
    expected_loss, expected_grads = loss_and_grads(model, *batch, seed=7)

    assert fused_qlora.keep_qkv_outputs(model) == layers
    monkeypatch.setattr(offload_activations, "kept_outputs_too", offloaded)
    replays = _count_replays(monkeypatch)
    loss_and_grads(model, *batch, seed=7)
    assert sum(replays) == 4 * layers
    assert _text_model(model).activation_offload.kept_offloaded == (4 * layers if offloaded else 0)
    _eager_and_graphed_steps_give(model, batch, expected_loss, expected_grads)
    assert _text_model(model).forward.failed is None


@GPU
def test_packed_graphed_training_with_offloading_learns_what_it_learns_without(tmp_path, monkeypatch, tiny_model_dir):
    torch._dynamo.reset()
    packed = ["--packing", "true", "--max_length", "512", "--pad_to_multiple_of", "512", "--attn_implementation",
              "flex_attention", "--cuda_graphs", "true"]  # fmt: skip
    runs = train_both_ways(tmp_path, monkeypatch, tiny_model_dir, 24, packed, switch="offload_activations")
    (stacks, offloaded_losses, offloaded, steps, trainer), (_, losses, kept, *_) = runs
    assert len(stacks) == 1 and stacks[0].failed is None and stacks[0].replays == steps > 3
    assert _text_model(trainer.model).activation_offload.offloaded > 0
    assert offloaded_losses == pytest.approx(losses, rel=2e-3)
    for name in kept:
        torch.testing.assert_close(offloaded[name], kept[name], rtol=2e-2, atol=1e-4)
