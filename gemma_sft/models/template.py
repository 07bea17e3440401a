"""Gemma 3's chat format: our template (the official one plus {% generation %} markers) and its stop tokens."""

import os
from pathlib import Path

from gemma_sft import PACKAGE_DIR, UserError

DEFAULT_CHAT_TEMPLATE = PACKAGE_DIR / "chat_templates" / "gemma3.jinja"
END_OF_TURN = "<end_of_turn>"


def read_chat_template(path: str | os.PathLike | None) -> str:
    """The template at `path`; a recipe's relative path is looked up from the working folder, then next to the
    package (a checkout), then among the templates installed with it."""
    if not path:
        return DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")
    for candidate in (Path(path), PACKAGE_DIR.parent / path, DEFAULT_CHAT_TEMPLATE.parent / Path(path).name):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise UserError(f"{path}: chat template file not found")


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at <eos> or at the end of the model's turn."""
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
