"""Export: the adapter merged into a 16-bit base (merge), one GGUF file for llama.cpp and Ollama (gguf_file) that
is read back in llama.cpp before it is published (verify), an OpenAI-compatible endpoint on llama.cpp's server
(serve), and the merged folder's layout checked against vLLM's and transformers' loaders (layout)."""

from gemma_sft.export.merge import check_destination, merged_model

__all__ = ["check_destination", "merged_model"]
