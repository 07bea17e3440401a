"""The output head's gradient computed in its forward pass: one projection onto the vocabulary fewer per step.

TRL's SFTTrainer scores only the supervised positions, through a chunked head that never holds all the logits at
once (`trl.kernels.ChunkedLogProbFunction`): the forward pass projects tiles of tokens x vocabulary and folds them
into log-sum-exp statistics; the backward pass projects every tile again to turn it into the logits' gradient. With
Gemma 3's 262k-word vocabulary each of those projections costs about what seven decoder layers' matmuls cost.

Here a chunk of tokens is projected onto the whole vocabulary once. One kernel reads each token's logits for the
log-sum-exp, the label's log-probability, the entropy and whether the label is the top token, then overwrites them
with d log p(label) / d logits; one matmul turns that into d log p(label) / d hidden, kept in fp32. A token's
log-probability depends on its own hidden state only, so the backward pass just scales those rows by the incoming
per-token gradient. Two projections instead of three, the same arithmetic otherwise (logits rounded to the compute
dtype, gradients summed in fp32, as TRL does).

Covers what SFT asks of the head: log-probabilities (with gradient), entropy and top-1 (metrics, no gradient), a
frozen output embedding. Any other request goes to TRL's own function.

TRL keeps only the supervised positions before the head (`hidden_states[mask]`), and the host waits for the GPU to
count them. Where the host already knows them (async_steps counts them when the batch is built), a training step
passes them in `scoring_positions`: TRL hands the head every position (its path for devices without Triton) and the
head keeps those, so nothing waits.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import _use_triton as _trl_use_triton  # TRL's test: keep only supervised positions?

TILE_BYTES = 1 << 30  # one token chunk's logits over the vocabulary: 2,048 tokens x Gemma 3's 262k in bf16
ROW_BLOCK, ROW_WARPS = 4096, 8  # the row kernel's vocabulary block and warps (bench/head_probe.py times others)
COVERED_OUTPUTS = {"log_probs", "entropy", "is_top1"}


@triton.jit
def _logits(y, logit_scale, softcap, inv_t, HAS_SOFTCAP: tl.constexpr):
    z = y * logit_scale
    if HAS_SOFTCAP:
        z = softcap * (2 * tl.sigmoid(2 * z / softcap) - 1)  # softcap * tanh(z / softcap)
    return z * inv_t


@triton.jit
def _head_rows_kernel(tile_ptr, stride, labels_ptr, log_probs_ptr, entropy_ptr, is_top1_ptr, vocab,
                      logit_scale, softcap, inv_t,
                      HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One token per program: statistics of its logits row, then (WRITE_GRAD) the row overwritten with
    d log p(label) / d projection output."""
    row_ptr = tile_ptr + tl.program_id(0).to(tl.int64) * stride
    label = tl.load(labels_ptr + tl.program_id(0))
    row_max = float("-inf")
    sum_exp = 0.0
    sum_exp_z = 0.0  # sum of exp(z - row_max) * z, for the entropy
    max_before_label = float("-inf")  # a tie with an earlier token is not a top-1 hit (argmax picks the first)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        z = _logits(tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32), logit_scale, softcap, inv_t,
                    HAS_SOFTCAP)  # fmt: skip
        z = tl.where(inside, z, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        e = tl.exp(z - new_max)
        rescale = tl.exp(row_max - new_max)
        sum_exp = sum_exp * rescale + tl.sum(e, axis=0)
        sum_exp_z = sum_exp_z * rescale + tl.sum(e * tl.where(inside, z, 0.0), axis=0)
        max_before_label = tl.maximum(max_before_label, tl.max(tl.where(cols < label, z, float("-inf")), axis=0))
        row_max = new_max
    label_z = _logits(tl.load(row_ptr + label).to(tl.float32), logit_scale, softcap, inv_t, HAS_SOFTCAP)
    log_z = row_max + tl.log(sum_exp)
    tl.store(log_probs_ptr + tl.program_id(0), label_z - log_z)
    tl.store(entropy_ptr + tl.program_id(0), log_z - sum_exp_z / sum_exp)
    tl.store(is_top1_ptr + tl.program_id(0), ((label_z >= row_max) & (label_z > max_before_label)).to(tl.int8))
    if WRITE_GRAD:
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < vocab
            y = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32) * logit_scale
            if HAS_SOFTCAP:
                t = 2 * tl.sigmoid(2 * y / softcap) - 1
                z = softcap * t * inv_t
            else:
                z = y * inv_t
            grad = tl.where(cols == label, 1.0, 0.0) - tl.exp(z - log_z)  # d log p(label) / dz
            grad = grad * inv_t
            if HAS_SOFTCAP:
                grad = grad * (1 - t * t)
            tl.store(row_ptr + cols, (grad * logit_scale).to(tile_ptr.dtype.element_ty), mask=inside)


def _head_rows_torch(tile, labels, logit_scale, softcap, inv_t, write_grad):
    """`_head_rows_kernel` in torch ops, in fp32: for CPUs."""
    y = tile.float() * logit_scale
    t = torch.tanh(y / softcap) if softcap else None
    z = (softcap * t if softcap else y) * inv_t
    log_z = torch.logsumexp(z, dim=-1)
    label_z = z.gather(1, labels[:, None]).squeeze(1)
    probs = torch.exp(z - log_z[:, None])
    entropy = log_z - (probs * z).sum(-1)
    before_label = torch.arange(z.shape[1], device=z.device)[None, :] < labels[:, None]
    max_before_label = z.masked_fill(~before_label, float("-inf")).amax(-1)
    is_top1 = (label_z >= z.amax(-1)) & (label_z > max_before_label)
    if write_grad:
        grad = probs.neg_().scatter_add_(1, labels[:, None], torch.ones_like(label_z[:, None])).mul_(inv_t)
        if softcap:
            grad.mul_(1 - t * t)
        tile.copy_(grad.mul_(logit_scale))
    return label_z - log_z, entropy, is_top1


def _uses_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class _LogProbsWithForwardGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, softcap, logit_scale, write_grad):
        ctx.set_materialize_grads(False)
        device, (tokens, width), vocab = hidden.device, hidden.shape, weight.shape[0]
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        kernel = _uses_triton(device)
        # the torch ops make several fp32 copies of a tile, so they get smaller chunks
        chunk = max(1, min(tokens, TILE_BYTES // (vocab * (dtype.itemsize if kernel else 32))))
        log_probs = torch.empty(tokens, device=device, dtype=torch.float32)
        entropy = torch.empty(tokens, device=device, dtype=torch.float32)
        is_top1 = torch.empty(tokens, device=device, dtype=torch.int8 if kernel else torch.bool)
        hidden_grad = torch.empty(tokens, width, device=device, dtype=torch.float32) if write_grad else None
        tile_buffer = torch.empty(chunk, vocab, device=device, dtype=dtype)
        args = (logit_scale, softcap or 1.0, 1.0 / temperature)
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            tile = tile_buffer[: end - start]
            torch.mm(hidden[start:end].to(dtype), weight.t(), out=tile)
            if bias is not None:
                tile.add_(bias)
            if kernel:
                _head_rows_kernel[(end - start,)](
                    tile, tile.stride(0), labels[start:end], log_probs[start:end], entropy[start:end],
                    is_top1[start:end], vocab, *args,
                    HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, BLOCK=ROW_BLOCK, num_warps=ROW_WARPS,
                )  # fmt: skip
            else:
                rows = _head_rows_torch(tile, labels[start:end], logit_scale, softcap, 1.0 / temperature, write_grad)
                for out, value in zip((log_probs, entropy, is_top1), rows):
                    out[start:end] = value
            if write_grad and device.type == "cuda" and dtype != torch.float32:
                torch.mm(tile, weight, out_dtype=torch.float32, out=hidden_grad[start:end])
            elif write_grad:
                torch.mm(tile.float(), weight.float(), out=hidden_grad[start:end])
        ctx.save_for_backward(hidden_grad)
        ctx.hidden_dtype = hidden.dtype
        is_top1 = is_top1.bool()
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *_):
        if grad_log_probs is None:
            return (None,) * 8
        (hidden_grad,) = ctx.saved_tensors
        grad_hidden = (hidden_grad * grad_log_probs.float()[:, None]).to(ctx.hidden_dtype)
        return (grad_hidden, *(None,) * 7)


_positions = None  # the flat indices of the supervised positions, set by `scoring_positions`


@contextlib.contextmanager
def scoring_positions(positions: torch.Tensor):
    """Within: TRL's fused head scores `positions` (flat indices into the shifted labels, on the model's device) and
    gives the others zero, without reading how many there are."""
    global _positions
    _positions = positions
    try:
        yield
    finally:
        _positions = None


def _compacts_on_device(device) -> bool:
    """Stands in for TRL's `_use_triton` where the fused head reads it: no compaction of its own while the positions
    are known."""
    return _positions is None and _trl_use_triton(device)


class LogProbsWithForwardGradient:
    """Stands in for `trl.kernels.ChunkedLogProbFunction` in TRL's fused LM head (same call, same outputs)."""

    @staticmethod
    def apply(hidden, weight, bias, labels, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=()):
        positions = _positions
        if positions is None:
            return LogProbsWithForwardGradient._scored(
                hidden, weight, bias, labels, temperature, chunk_size, softcap, logit_scale, outputs
            )
        kept = LogProbsWithForwardGradient._scored(
            hidden.index_select(0, positions), weight, bias, labels.index_select(0, positions), temperature,
            chunk_size, softcap, logit_scale, outputs,
        )  # fmt: skip
        every = hidden.size(0)
        return tuple(None if x is None else x.new_zeros(every).index_copy(0, positions, x) for x in kept)

    @staticmethod
    def _scored(hidden, weight, bias, labels, temperature, chunk_size, softcap, logit_scale, outputs):
        grad_enabled = torch.is_grad_enabled()
        trains_head = grad_enabled and (weight.requires_grad or (bias is not None and bias.requires_grad))
        if trains_head or not set(outputs) <= COVERED_OUTPUTS:
            return ChunkedLogProbFunction.apply(
                hidden, weight, bias, labels, temperature, chunk_size, softcap, logit_scale, outputs
            )
        log_probs, entropy, is_top1 = _LogProbsWithForwardGradient.apply(
            hidden, weight, bias, labels, temperature, softcap, logit_scale, grad_enabled and hidden.requires_grad
        )
        entropy = entropy if "entropy" in outputs else None
        return log_probs, entropy, None, None, is_top1 if "is_top1" in outputs else None


# Putting it in place (gemma_sft/patches/registry.py turns it on and off)
def install() -> None:
    import trl.trainer.utils as trl_utils

    trl_utils.__dict__["_ChunkedLogProbFunction"], trl_utils.__dict__["_use_triton"]  # a KeyError if TRL renamed them
    trl_utils._ChunkedLogProbFunction = LogProbsWithForwardGradient
    trl_utils._use_triton = _compacts_on_device


def installed() -> bool:
    import trl.trainer.utils as trl_utils

    return trl_utils._ChunkedLogProbFunction is LogProbsWithForwardGradient


def uninstall() -> None:
    import trl.trainer.utils as trl_utils

    if "_ChunkedLogProbFunction" in trl_utils.__dict__:
        trl_utils._ChunkedLogProbFunction = ChunkedLogProbFunction
    if trl_utils.__dict__.get("_use_triton") is _compacts_on_device:
        from trl.kernels.chunked_logprob import _use_triton  # TRL's own, even where a test stands in for ours

        trl_utils._use_triton = _use_triton
