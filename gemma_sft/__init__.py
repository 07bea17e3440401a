"""QLoRA instruction fine-tuning of Gemma 3 on TRL: the package behind sft.py, evaluate.py, chat.py, merge.py,
export.py, webui.py and the `gemma-sft` command.

    config, plan     the typed recipe, and every setting derived from it and the machine (one function, printed)
    checks, resume   value checks before anything loads; a resume that refuses changed settings
    data/            rows -> chat messages -> tokens with the answer mask -> held-out and training rows
    models/          tokenizer with our chat template, base model (4-bit or not), the embedded Gemma 3 270M
    patches/         each replacement of another library's code, with its switch and checked version
    trainer          TRL's SFTTrainer with the patches and guards
    inference/       scoring, generation and the base-vs-adapter report
    export/          merging into a 16-bit base, GGUF files, serving
    outputs, publish what a run writes, and how (atomically, one run per folder)
"""

import logging
import os
from pathlib import Path

from gemma_sft.errors import UserError, hub_error, run

__all__ = ["PACKAGE_DIR", "REPO_ROOT", "UserError", "cache_dir", "hub_error", "run"]

# bitsandbytes looks for an optional CPU kernel on the Hugging Face kernel hub at import and warns when it can't:
# its built-in CPU path is used instead, so the warning is only noise (and confusing offline).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # a checkout's root: recipes/ and data/ are found there (or from the working folder)


def cache_dir() -> Path:
    """Where converted models and prepared data are kept: GEMMA_SFT_CACHE, else ~/.cache/gemma-sft."""
    root = (
        os.environ.get("GEMMA_SFT_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma-sft"
    )
    return Path(root)
