"""Inference on a base model with its adapter: scoring (answer loss), generation (greedy or streamed, one path for
the report, the terminal chat and the web page) and the base-vs-adapter report."""

from gemma_sft.inference.generate import MODEL_LOCK, build_messages, generate, render_prompt, stream_reply
from gemma_sft.inference.report import WHAT_TO_TRY, compare, plot_loss_curve, warnings_for
from gemma_sft.inference.score import answer_loss, by_category, unpacked_attention

__all__ = [
    "MODEL_LOCK", "WHAT_TO_TRY", "answer_loss", "build_messages", "by_category", "compare", "generate",
    "plot_loss_curve", "render_prompt", "stream_reply", "unpacked_attention", "warnings_for",
]  # fmt: skip
