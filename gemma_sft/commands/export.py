"""Merge a LoRA adapter into its 16-bit base and export one GGUF file for llama.cpp and Ollama.

    python export.py --adapter outputs/gemma3-4b-belle-qlora --output outputs/gemma3-4b-belle-gguf [--type q8_0]

The base is loaded in bf16 (never 4-bit) and merged as merge.py does. The output folder gets NAME.gguf (the text
model, our chat template, <end_of_turn> as the end-of-generation token), an Ollama Modelfile and a README with the
`ollama create` and `llama-cli` commands. For gemma-3-4b-it and the other multimodal Gemma 3 models only the
language model is exported: the vision tower is left out, so the GGUF takes text, not images. --type f16 keeps the
weights at 16 bits; q8_0 quantizes the weight matrices to 8 bits (about half the size). The folder is built under
a temporary name and renamed, so a failed export leaves nothing behind.

Before the folder is published the file is read back in llama.cpp (gemma_sft/export/verify.py): on three fixed chats
its prompt (one <bos>) and greedy answer must be the merged model's, and it must stop at <end_of_turn>; otherwise
the export is refused with one line and nothing is written. --no-verify skips this (e.g. without llama.cpp).
"""

import argparse
from pathlib import Path

from gemma_sft.errors import UserError
from gemma_sft.publish import publish_dir


def main(argv: list[str] | None = None) -> int:
    from gemma_sft import models
    from gemma_sft.export import check_destination, gguf_file, merged_model, verify

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="output_dir of a finished sft.py run")
    parser.add_argument("--output", required=True, help="folder for the GGUF file, Modelfile and README")
    parser.add_argument("--type", choices=gguf_file.TYPES, default="f16", help="weight type (default f16)")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--name", help="model name for the file and `ollama create` (default: the output folder's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="publish without reading the file back in llama.cpp")  # fmt: skip
    args = parser.parse_args(argv)

    output = check_destination(args.output, args.overwrite)
    models.read_adapter_recipe(args.adapter)  # a missing adapter is the first thing said, before llama.cpp
    if args.verify and (missing := verify.llama_cpp_missing()):
        raise UserError(missing)  # before minutes of merging
    merged, tokenizer, base_path = merged_model(args.adapter, args.base)

    stem = args.name or output.name
    multimodal = hasattr(merged.config, "text_config")

    def write(folder: Path) -> None:
        gguf_file.write_gguf(
            folder / f"{stem}.gguf", merged.state_dict(), merged.config, tokenizer, kind=args.type, name=stem,
            model_dirs=[args.adapter, base_path],
        )  # fmt: skip
        (folder / "Modelfile").write_text(gguf_file.modelfile(f"{stem}.gguf"), encoding="utf-8")
        (folder / "README.md").write_text(gguf_file.readme(stem, args.type, multimodal), encoding="utf-8")
        if args.verify:  # inside the build: a refused file is removed with its temporary folder
            try:
                checked.append(verify.check_gguf(folder / f"{stem}.gguf", merged, tokenizer, args.type))
            except UserError as error:
                raise UserError(f"{error}; {output} was left as it was (--no-verify skips this check)") from None

    checked = []
    publish_dir(write, output, replace=True)
    print(checked[0] if checked else "not checked in llama.cpp (--no-verify)")
    what = "language model only, vision tower left out" if multimodal else "text model"
    print(f"GGUF ({args.type}, {what}) saved to {output / (stem + '.gguf')}; `ollama create {stem} -f Modelfile`")
    return 0


RUN_OPTIONS: dict = {}
