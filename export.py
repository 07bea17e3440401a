"""Merge a LoRA adapter into its 16-bit base and export one GGUF file for llama.cpp and Ollama.

    python export.py --adapter outputs/gemma3-4b-belle-qlora --output outputs/gemma3-4b-belle-gguf [--type q8_0]

The base is loaded in bf16 (never 4-bit) and merged as merge.py does. The output folder gets NAME.gguf (the text
model, our chat template, <end_of_turn> as the end-of-generation token), an Ollama Modelfile and a README with the
`ollama create` and `llama-cli` commands. For gemma-3-4b-it and the other multimodal Gemma 3 models only the
language model is exported: the vision tower is left out, so the GGUF takes text, not images. --type f16 keeps the
weights at 16 bits; q8_0 quantizes the weight matrices to 8 bits (about half the size). The folder is built under
a temporary name and renamed, so a failed export leaves nothing behind.
"""

from gemma_sft.commands.export import RUN_OPTIONS, main
from gemma_sft.errors import run

__all__ = ["main"]

if __name__ == "__main__":
    run(main, **RUN_OPTIONS)
