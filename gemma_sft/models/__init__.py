"""The models: the tokenizer with our Gemma 3 chat template, the base model (4-bit when the recipe asks), a base with
its trained adapter for inference, and the embedded Gemma 3 270M."""

from gemma_sft.models.loading import (
    adapter_base,
    fetch_error,
    load_for_inference,
    load_model,
    load_tokenizer,
    read_adapter_recipe,
    read_tokenizer,
    resolve_model,
    resolve_tokenizer,
)
from gemma_sft.models.template import DEFAULT_CHAT_TEMPLATE, END_OF_TURN, read_chat_template, stop_token_ids

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "END_OF_TURN", "adapter_base", "fetch_error", "load_for_inference", "load_model",
    "load_tokenizer", "read_adapter_recipe", "read_chat_template", "read_tokenizer", "resolve_model",
    "resolve_tokenizer", "stop_token_ids",
]  # fmt: skip
