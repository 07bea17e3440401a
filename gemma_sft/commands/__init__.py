"""The verbs, one module each; sft.py, evaluate.py, chat.py, merge.py, export.py, webui.py and serve.py at the top of
a checkout and the `gemma-sft` command are thin wrappers over them."""

VERBS = {
    "train": "fine-tune from a YAML recipe (sft.py)",
    "eval": "base vs adapter on held-out rows -> ADAPTER/report.md (evaluate.py)",
    "chat": "talk to the adapter in the terminal (chat.py)",
    "merge": "merge the adapter into a 16-bit base (merge.py)",
    "export": "one GGUF file for llama.cpp and Ollama (export.py)",
    "webui": "base and adapter side by side in the browser (webui.py)",
    "serve": "an OpenAI-compatible endpoint for the adapter's GGUF export (serve.py)",
}
MODULES = {
    "train": "train",
    "eval": "evaluate",
    "chat": "chat",
    "merge": "merge",
    "export": "export",
    "webui": "webui",
    "serve": "serve",
}
