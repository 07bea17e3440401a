"""Compare the base model and base + adapter on held-out data: answer loss, perplexity, greedy generations.

    python evaluate.py --adapter outputs/gemma3-270m-belle-demo                # the run's own held-out rows
    python evaluate.py --adapter outputs/gemma3-4b-belle-qlora --data data/belle_eval_zh.jsonl   # our held-out set

Rows with a "category" field are also scored by category; the report warns where the adapter is worse than the base.

Writes ADAPTER/report.md, ADAPTER/eval_report.json and ADAPTER/loss_curve.png.
"""

import argparse

from gemma_sft import UserError


def main(argv: list[str] | None = None) -> int:
    from gemma_sft import data, inference, models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="output_dir of a finished sft.py run")
    parser.add_argument("--data", help="a data file in any supported format (default: the run's held-out rows)")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--num_prompts", type=int, default=5, help="rows to generate answers for (0 = none)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    args = parser.parse_args(argv)

    model, tokenizer, recipe = models.load_for_inference(args.adapter, args.base)
    if args.data:
        rows = data.load_conversations(args.data)
        prepared = data.prepare(rows, tokenizer, max_samples=0, eval_samples=0, max_length=None, seed=0)
        conversations, categories = list(prepared.train_messages), list(prepared.train_categories)
    else:  # redraw the run's held-out rows: same source, seed and sizes give the same split
        if "dataset_name" not in recipe:
            raise UserError(f"{args.adapter}: no recipe.yaml to redraw the held-out rows from; pass --data FILE")
        prepared = data.prepare_from_settings(recipe, tokenizer)
        conversations, categories = prepared.eval_messages, prepared.eval_categories
        if not conversations:
            raise UserError(f"{args.adapter}: the run held out no rows (eval_samples: 0); pass --data FILE")
    result = inference.compare(
        model, tokenizer, conversations, args.adapter, args.num_prompts, args.max_new_tokens, categories
    )
    for prompt, before, after in result["generations"]:
        print(f"\n>>> {prompt[-1]['content']}\n[base]    {before}\n[adapter] {after}")
    print("\n" + result["summary"])
    return 0


RUN_OPTIONS: dict = {}
