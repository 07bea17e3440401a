"""Merge a LoRA adapter into a 16-bit copy of its base model and save a standalone model that plain transformers loads.

    python merge.py --adapter outputs/gemma3-4b-belle-qlora --output outputs/gemma3-4b-belle-merged

The base is loaded in bf16, never 4-bit: merging into quantized weights is lossy. The output gets the tokenizer with
our chat template and <end_of_turn> as a stop token, and is written under a temporary name first, then renamed (an
existing --output is replaced only once the new one is whole).
"""

from gemma_sft.commands.merge import RUN_OPTIONS, main
from gemma_sft.errors import run

__all__ = ["main"]

if __name__ == "__main__":
    run(main, **RUN_OPTIONS)
