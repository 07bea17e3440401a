"""Merge a LoRA adapter into its 16-bit base and export one GGUF file for llama.cpp and Ollama.

    python export.py --adapter outputs/gemma3-4b-belle-qlora --output outputs/gemma3-4b-belle-gguf [--type q8_0]

The base is loaded in bf16 (never 4-bit) and merged as merge.py does. The output folder gets NAME.gguf (the text
model, our chat template, <end_of_turn> as the end-of-generation token), an Ollama Modelfile and a README with the
`ollama create` and `llama-cli` commands. For gemma-3-4b-it and the other multimodal Gemma 3 models only the
language model is exported: the vision tower is left out, so the GGUF takes text, not images. --type f16 keeps the
weights at 16 bits; q8_0 quantizes the weight matrices to 8 bits (about half the size). The folder is built under
a temporary name and renamed, so a failed export leaves nothing behind.
"""

import argparse
import os
from pathlib import Path

from gemma_sft import UserError, run
from gemma_sft.publish import publish_dir


def main(argv: list[str] | None = None) -> int:
    from gemma_sft import gguf_export

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="output_dir of a finished sft.py run")
    parser.add_argument("--output", required=True, help="folder for the GGUF file, Modelfile and README")
    parser.add_argument("--type", choices=gguf_export.TYPES, default="f16", help="weight type (default f16)")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--name", help="model name for the file and `ollama create` (default: the output folder's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} already exists: choose another --output or pass --overwrite")
    # Before the minutes of loading and merging: a destination under a file or a read-only folder fails now.
    existing = next(parent for parent in output.absolute().parents if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"{output}: cannot write there ({existing} is not a writable folder)")
    from gemma_sft import modeling

    base, _ = modeling.adapter_base(args.adapter, args.base)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = modeling.resolve_model(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    except OSError as exc:
        raise modeling.fetch_error("base model", base, exc) from None
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)  # saved by sft.py with our chat template
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    merged.generation_config.eos_token_id = modeling.stop_token_ids(tokenizer)

    stem = args.name or output.name
    multimodal = hasattr(merged.config, "text_config")

    def write(folder: Path) -> None:
        # The temporary folder is created private (0700); the result is meant to be shared like any other output.
        umask = os.umask(0)
        os.umask(umask)
        folder.chmod(0o777 & ~umask)
        gguf_export.write_gguf(
            folder / f"{stem}.gguf", merged.state_dict(), merged.config, tokenizer, kind=args.type, name=stem,
            model_dirs=[args.adapter, base_path],
        )  # fmt: skip
        (folder / "Modelfile").write_text(gguf_export.modelfile(f"{stem}.gguf"), encoding="utf-8")
        (folder / "README.md").write_text(gguf_export.readme(stem, args.type, multimodal), encoding="utf-8")

    publish_dir(write, output, replace=True)
    what = "language model only, vision tower left out" if multimodal else "text model"
    print(f"GGUF ({args.type}, {what}) saved to {output / (stem + '.gguf')}; `ollama create {stem} -f Modelfile`")
    return 0


if __name__ == "__main__":
    run(main)
