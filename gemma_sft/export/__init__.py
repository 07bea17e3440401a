"""Export: the adapter merged into a 16-bit base (merge), one GGUF file for llama.cpp and Ollama (gguf_file)."""

from gemma_sft.export.merge import check_destination, merged_model

__all__ = ["check_destination", "merged_model"]
