"""Merge a LoRA adapter into a 16-bit copy of its base model and save a standalone model that plain transformers loads.

    python merge.py --adapter outputs/gemma3-4b-belle-qlora --output outputs/gemma3-4b-belle-merged

The base is loaded in bf16, never 4-bit: merging into quantized weights is lossy. The output gets the tokenizer with
our chat template and <end_of_turn> as a stop token, and is written under a temporary name first, then renamed (an
existing --output is replaced only once the new one is whole).
"""

import argparse
from pathlib import Path

from gemma_sft import UserError, run
from gemma_sft.publish import publish_dir


def main(argv: list[str] | None = None) -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma_sft import modeling

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="output_dir of a finished sft.py run")
    parser.add_argument("--output", required=True, help="folder for the merged model (must not exist)")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} already exists: choose another --output or pass --overwrite")
    base, _ = modeling.adapter_base(args.adapter, args.base)
    try:
        model = AutoModelForCausalLM.from_pretrained(modeling.resolve_model(base), dtype=getattr(torch, args.dtype))
    except OSError as exc:
        raise modeling.fetch_error("base model", base, exc) from None
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    merged.generation_config.eos_token_id = modeling.stop_token_ids(tokenizer)

    def write(folder):
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    publish_dir(write, output, replace=True)
    print(f"Merged model saved to {output} ({args.dtype}); load it with AutoModelForCausalLM.from_pretrained")
    return 0


if __name__ == "__main__":
    run(main)
