"""Merging, one way for merge.py, export.py and serving: the adapter folded into a 16-bit copy of its base model."""

import os
from pathlib import Path

from gemma_sft.errors import UserError


def check_destination(output: str | os.PathLike, overwrite: bool) -> Path:
    """Before minutes of loading and merging: an existing folder (without overwrite), a destination under a file or
    in a read-only folder fail now, with one line."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"{output} already exists: choose another --output or pass --overwrite")
    existing = next(parent for parent in output.absolute().parents if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"{output}: cannot write there ({existing} is not a writable folder)")
    return output


def merged_model(adapter_dir: str | os.PathLike, base: str | None = None, dtype: str = "bfloat16"):
    """(model with the adapter merged in, the adapter's tokenizer, the base model's local path). The base is loaded
    in `dtype`, never 4-bit: merging into quantized weights is lossy."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gemma_sft import models

    base, _ = models.adapter_base(adapter_dir, base)
    base_path = models.resolve_model(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype))
    except OSError as exc:
        raise models.fetch_error("base model", base, exc) from None
    tokenizer = models.read_tokenizer(str(adapter_dir))  # saved with our chat template
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.generation_config.eos_token_id = models.stop_token_ids(tokenizer)
    return merged, tokenizer, base_path
