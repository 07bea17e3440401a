"""Merge a LoRA adapter into a 16-bit copy of its base model and save a standalone model that plain transformers loads.

    python merge.py --adapter outputs/gemma3-4b-belle-qlora --output outputs/gemma3-4b-belle-merged

The base is loaded in bf16, never 4-bit: merging into quantized weights is lossy. The output gets the tokenizer with
our chat template and <end_of_turn> as a stop token, and is written under a temporary name first, then renamed (an
existing --output is replaced only once the new one is whole).
"""

import argparse

from gemma_sft.publish import publish_dir


def main(argv: list[str] | None = None) -> int:
    from gemma_sft.export import check_destination, merged_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="output_dir of a finished sft.py run")
    parser.add_argument("--output", required=True, help="folder for the merged model (must not exist)")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    output = check_destination(args.output, args.overwrite)
    merged, tokenizer, _ = merged_model(args.adapter, args.base, args.dtype)

    def write(folder):
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    publish_dir(write, output, replace=True)
    print(f"Merged model saved to {output} ({args.dtype}); load it with AutoModelForCausalLM.from_pretrained")
    return 0


RUN_OPTIONS: dict = {}
