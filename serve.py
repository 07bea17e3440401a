"""Serve a trained adapter behind an OpenAI-compatible endpoint: llama.cpp's server over its GGUF export.

    python serve.py --adapter outputs/gemma3-270m-belle-demo [--gguf outputs/gemma3-270m-belle-demo-gguf] [--port 8000]
    python serve.py --adapter outputs/gemma3-4b-belle-qlora --engine vllm    # the vLLM command lines for a CUDA GPU

Listens on 127.0.0.1 unless --host says otherwise (it warns: no API key unless --api_key). The model name, context
length and chat template come from the adapter's folder; answers end at <end_of_turn>.
"""

from gemma_sft.commands.serve import RUN_OPTIONS, main
from gemma_sft.errors import run

__all__ = ["main"]

if __name__ == "__main__":
    run(main, **RUN_OPTIONS)
