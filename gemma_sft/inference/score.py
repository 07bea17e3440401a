"""Scoring: the mean answer-token loss of a model on chat conversations, pooled and by category."""

import math
from contextlib import contextmanager

import torch

from gemma_sft.data.answer_mask import tokenize


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def unpacked_attention(model):
    """sdpa in place of flex_attention while the model reads one row at a time.

    flex_attention is for packed training rows of one fixed length; every held-out row or generation step has a new
    length, which on a GPU recompiles its kernel with dynamic shapes, and torch's flex template then finds no kernel
    to compile. A single row needs only the causal mask, which sdpa gives exactly.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    if before != "flex_attention":
        yield
        return
    base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        base.set_attn_implementation(before)


@torch.no_grad()
def answer_loss(model, tokenizer, conversations: list[list[dict]], max_positions: int = 1024) -> dict:
    """Mean cross-entropy over the supervised tokens (each answer and its <end_of_turn>), pooled over all rows.

    One row per forward pass, and the output head runs only at the supervised positions, at most `max_positions` per
    pass: logits over the 262k vocabulary for a whole batch of long rows would not fit the cards training fits.
    """
    model.eval()
    device = _device(model)
    total_loss, total_tokens, per_row = 0.0, 0, []
    for messages in conversations:
        encoded = tokenize(tokenizer, messages)
        ids = torch.tensor([encoded["input_ids"]], device=device)
        # position t predicts token t + 1: the positions before each supervised token
        targets = [(t - 1, token) for t, (token, m) in enumerate(zip(encoded["input_ids"], encoded["assistant_masks"]))
                   if m and t > 0]  # fmt: skip
        row_loss = 0.0
        for start in range(0, len(targets), max_positions):
            chunk = targets[start : start + max_positions]
            positions = torch.tensor([t for t, _ in chunk], device=device)
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=positions).logits[0]
            labels = torch.tensor([token for _, token in chunk], device=device)
            row_loss += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        total_loss += row_loss
        total_tokens += len(targets)
        per_row.append((row_loss, len(targets)))
    loss = total_loss / max(total_tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "tokens": total_tokens,
        "rows": len(conversations),
        "per_row": per_row,
    }


def by_category(result: dict, categories: list[str | None]) -> dict[str, float]:
    """Answer loss per category (pooled over the category's supervised tokens), from `answer_loss`'s rows."""
    sums: dict[str, list[float]] = {}
    for (row_loss, tokens), category in zip(result["per_row"], categories):
        if category is not None:
            entry = sums.setdefault(category, [0.0, 0])
            entry[0] += row_loss
            entry[1] += tokens
    return {name: loss / max(tokens, 1) for name, (loss, tokens) in sorted(sums.items())}
