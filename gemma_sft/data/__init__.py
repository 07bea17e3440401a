"""Instruction data, one way: sources (files, Hub) -> formats (chat messages) -> tables (checked, tokenized with the
answer mask, cached) -> sampling (held-out and training rows) -> summary. Every problem with a row is a one-line
error naming its file, line and field, or a skip counted by reason; nothing is dropped silently."""

from gemma_sft.data.answer_mask import tokenize, tokenize_many
from gemma_sft.data.formats import FORMATS, Skip, category_of, detect_format, to_messages
from gemma_sft.data.sampling import PreparedData, prepare, prepare_from_settings, prepare_streaming
from gemma_sft.data.sources import Record, load_records, read_local
from gemma_sft.data.summary import summarize
from gemma_sft.data.tables import Column, Conversations, load_conversations, tokenize_rows

__all__ = [
    "FORMATS", "Column", "Conversations", "PreparedData", "Record", "Skip", "category_of", "detect_format",
    "load_conversations", "load_records", "prepare", "prepare_from_settings", "prepare_streaming", "read_local",
    "summarize", "to_messages", "tokenize", "tokenize_many", "tokenize_rows",
]  # fmt: skip
