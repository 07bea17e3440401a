"""The output head that computes its gradient in the forward pass (gemma_sft/patches/output_head.py), against the full
logits in float64 and against TRL's own chunked head. On CPU the head runs in torch ops here and its Triton kernel
runs in Triton's interpreter, in fp32, in a fresh process (`test_kernel_under_triton_interpreter`); on a GPU the
kernel runs compiled, in bf16."""

import os
import subprocess
import sys

import pytest
import torch
import trl.trainer.utils as trl_utils
from trl.kernels import ChunkedLogProbFunction

from gemma_sft import REPO_ROOT, patches
from gemma_sft.patches import output_head

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ALL_OUTPUTS = ("log_probs", "entropy", "is_top1")


@pytest.fixture(scope="module")
def backend():
    """(device, dtype, tolerance) the head runs in: torch ops or the interpreted kernel on CPU, the kernel on a GPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, 2e-2
    return torch.device("cpu"), torch.float32, 1e-4


def full_logits_reference(hidden, weight, labels, softcap=None, logit_scale=1.0, temperature=1.0):
    """Per-token log-probability (with autograd), entropy and top-1 from the whole logits matrix in float64."""
    hidden64 = hidden.detach().double().requires_grad_()
    z = hidden64 @ weight.double().t() * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return hidden64, log_p.gather(1, labels[:, None]).squeeze(1), entropy.detach(), z.argmax(-1) == labels


def random_head(tokens, vocab, width, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=generator) / width**0.25
    weight = torch.randn(vocab, width, generator=generator) / width**0.25
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    return hidden.to(device, dtype).requires_grad_(), weight.to(device, dtype), labels.to(device)


@pytest.mark.parametrize(
    ("softcap", "logit_scale", "temperature"), [(None, 1.0, 1.0), (30.0, 1.0, 1.0), (None, 0.5, 0.7), (3.0, 2.0, 1.3)]
)
@pytest.mark.parametrize(("tokens", "vocab", "tile_rows"), [(37, 1000, 8), (6, 9000, 4)])  # 9,000: several blocks
def test_values_and_hidden_gradient_equal_the_full_logits(
    backend, monkeypatch, softcap, logit_scale, temperature, tokens, vocab, tile_rows
):
    """Several token chunks per call (a small tile); the loss weighs each token differently, as any per-token loss
    (DFT, a mean over several micro-batches) would, and the backward pass must apply those weights."""
    device, dtype, tolerance = backend
    monkeypatch.setattr(output_head, "TILE_BYTES", tile_rows * vocab * (dtype.itemsize if device.type == "cuda" or
                                                                         INTERPRETED else 32))  # fmt: skip
    hidden, weight, labels = random_head(tokens, vocab, 64, device, dtype)
    log_probs, entropy, _, _, is_top1 = output_head.LogProbsWithForwardGradient.apply(
        hidden, weight, None, labels, temperature, 4096, softcap, logit_scale, ALL_OUTPUTS
    )
    token_weights = torch.rand(tokens, generator=torch.Generator().manual_seed(1)).to(device)
    (log_probs * token_weights).sum().backward()

    hidden64, ref_log_probs, ref_entropy, ref_top1 = full_logits_reference(
        hidden, weight, labels, softcap, logit_scale, temperature
    )
    (ref_log_probs * token_weights.double()).sum().backward()
    torch.testing.assert_close(log_probs.double(), ref_log_probs.detach(), atol=tolerance * 4, rtol=tolerance)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=tolerance * 4, rtol=tolerance)
    assert torch.equal(is_top1, ref_top1) or dtype != torch.float32  # bf16 logits may reorder near-ties
    assert hidden.grad.dtype == dtype
    scale = hidden64.grad.abs().max().item()
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, atol=tolerance * scale, rtol=tolerance)


def test_same_outputs_as_trls_chunked_head(backend):
    """Same call and same tuple as the function it stands in for; what was not asked for is None."""
    device, dtype, tolerance = backend
    hidden, weight, labels = random_head(50, 3000, 64, device, dtype, seed=2)
    for outputs in (ALL_OUTPUTS, ("log_probs",)):
        ours = output_head.LogProbsWithForwardGradient.apply(hidden, weight, None, labels, 1.0, 1024, None, 1.0,
                                                             outputs)  # fmt: skip
        theirs = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 1024, None, 1.0, outputs)
        assert len(ours) == len(theirs) == 5
        for mine, reference in zip(ours, theirs):
            assert (mine is None) == (reference is None)
            if mine is not None:
                assert mine.dtype == reference.dtype and mine.shape == reference.shape
                torch.testing.assert_close(mine.float(), reference.float(), atol=tolerance * 4, rtol=tolerance)


def test_a_tie_with_an_earlier_token_is_not_a_top1_hit(backend):
    """argmax picks the first of equal logits, so the label is top-1 only if no earlier token ties with it."""
    device, dtype, _ = backend
    weight = torch.zeros(300, 64)
    weight[3, 0] = weight[5, 0] = 1.0  # tokens 3 and 5: the same logit, the largest
    hidden = torch.zeros(2, 64)
    hidden[:, 0] = 4.0
    labels = torch.tensor([3, 5])
    *_, is_top1 = output_head.LogProbsWithForwardGradient.apply(
        hidden.to(device, dtype), weight.to(device, dtype), None, labels.to(device), 1.0, 1024, None, 1.0, ALL_OUTPUTS
    )
    assert is_top1.tolist() == [True, False]


def test_requests_it_does_not_cover_go_to_trls_head(backend):
    """A trained output embedding (its gradient needs every token's weight) or another per-token output."""
    device, dtype, _ = backend
    hidden, weight, labels = random_head(20, 500, 64, device, dtype, seed=3)
    weight.requires_grad_()
    log_probs, *_ = output_head.LogProbsWithForwardGradient.apply(hidden, weight, None, labels, 1.0, 1024, None, 1.0,
                                                                  ("log_probs",))  # fmt: skip
    log_probs.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    _, _, _, mean_logits, _ = output_head.LogProbsWithForwardGradient.apply(
        hidden, weight, None, labels, 1.0, 1024, None, 1.0, ("log_probs", "mean_logits")
    )
    assert mean_logits is not None


def test_without_gradients_nothing_is_kept_for_a_backward_pass(backend):
    device, dtype, _ = backend
    hidden, weight, labels = random_head(20, 500, 64, device, dtype, seed=4)
    with torch.no_grad():
        log_probs, *_ = output_head.LogProbsWithForwardGradient.apply(
            hidden, weight, None, labels, 1.0, 1024, None, 1.0, ALL_OUTPUTS
        )
    assert log_probs.grad_fn is None
    _, reference, _, _ = full_logits_reference(hidden, weight, labels)
    torch.testing.assert_close(log_probs.double(), reference.detach(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("supervised", [[0, 3, 4, 9, 30, 31], []], ids=["some", "none"])
def test_positions_known_on_the_host_give_what_trls_compaction_gives(backend, supervised):
    """TRL hands every position (its labels clamped) while the supervised ones are given: the head scores those, as
    TRL's boolean compaction would hand them, and gives the others zero; the hidden gradient is the same."""
    device, dtype, _ = backend
    hidden, weight, labels = random_head(32, 700, 64, device, dtype, seed=5)
    positions = torch.tensor(supervised, dtype=torch.long, device=device)
    mask = torch.zeros(32, dtype=torch.bool, device=device).index_fill_(0, positions, True)
    per_token = torch.rand(32, generator=torch.Generator().manual_seed(1)).to(device)
    compacted = output_head.LogProbsWithForwardGradient.apply(hidden[mask], weight, None, labels[mask], 1.0, 1024,
                                                              None, 1.0, ALL_OUTPUTS)  # fmt: skip
    theirs = [None if x is None else x.new_zeros(32).masked_scatter(mask, x) for x in compacted]  # as TRL does
    with output_head.scoring_positions(positions):
        ours = output_head.LogProbsWithForwardGradient.apply(hidden, weight, None, labels, 1.0, 1024, None, 1.0,
                                                             ALL_OUTPUTS)  # fmt: skip
    assert output_head._positions is None
    for mine, reference in zip(ours, theirs):
        assert (mine is None) == (reference is None)
        if mine is not None:
            assert mine.dtype == reference.dtype and torch.equal(mine, reference)
            assert not mine[~mask].any()
    (our_grad,) = torch.autograd.grad((ours[0] * per_token).sum(), hidden)
    (their_grad,) = torch.autograd.grad((theirs[0] * per_token).sum(), hidden)
    assert torch.equal(our_grad, their_grad) and (our_grad[mask].abs().sum() > 0) == bool(supervised)
    assert not our_grad[~mask].any()


def test_kernel_under_triton_interpreter():
    if torch.cuda.is_available() or INTERPRETED:
        pytest.skip("the kernel runs compiled on this GPU / this is the interpreted run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    selection = "not trl_fused_head and not build_trainer"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-k", selection,
               __file__]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "14 passed, 1 skipped" in result.stdout, result.stdout[-500:]  # skipped: this launcher


def test_trl_fused_head_gives_the_same_loss_and_gradients_through_it(monkeypatch, tiny_model_dir):
    """The tiny Gemma 3 with TRL's fused LM head (what SFTTrainer's loss calls), its output embedding frozen as in
    QLoRA: the same loss, metrics and gradients with TRL's chunked function and with ours, which must be the one
    called once installed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)
    trl_utils.add_fused_lm_head(model, outputs=ALL_OUTPUTS)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 1000, (2, 40), generator=generator)
    labels = input_ids.clone()
    labels[:, :15] = -100

    def loss_and_gradients():
        model.zero_grad()
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True, num_items_in_batch=torch.tensor(33))
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        return out, grads

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)
    theirs, their_grads = loss_and_gradients()
    calls = []
    function = output_head._LogProbsWithForwardGradient
    original_apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: calls.append(1) or original_apply(*args))
    patches.enable("fused_output_head")
    ours, our_grads = loss_and_gradients()
    assert calls == [1]
    torch.testing.assert_close(ours.loss, theirs.loss)
    torch.testing.assert_close(ours.entropy, theirs.entropy)
    assert torch.equal(ours.is_top1, theirs.is_top1)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 10
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_build_trainer_installs_it(monkeypatch, tmp_path, tiny_model_dir):
    from conftest import TINY_RECIPE_FLAGS, belle_rows, write_jsonl

    from gemma_sft import config, data, models
    from gemma_sft.trainer import build_trainer

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(8))
    _, training_args, model_args, resolved, *_ = config.parse(
        ["recipes/gemma3_270m_belle_demo.yaml", "--model_path", str(tiny_model_dir), "--data_path", str(rows),
         "--output_dir", str(tmp_path / "out"), *TINY_RECIPE_FLAGS]
    )  # fmt: skip
    tokenizer = models.load_tokenizer(str(tiny_model_dir), training_args.chat_template_path)
    build_trainer(training_args, model_args, data.prepare_from_settings(resolved, tokenizer), tokenizer)
    assert trl_utils._ChunkedLogProbFunction is output_head.LogProbsWithForwardGradient
