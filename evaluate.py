"""Compare the base model and base + adapter on held-out data: answer loss, perplexity, greedy generations.

    python evaluate.py --adapter outputs/gemma3-270m-belle-demo                # the run's own held-out rows
    python evaluate.py --adapter outputs/gemma3-4b-belle-qlora --data data/belle_eval_zh.jsonl   # our held-out set

Rows with a "category" field are also scored by category; the report warns where the adapter is worse than the base.

Writes ADAPTER/report.md, ADAPTER/eval_report.json and ADAPTER/loss_curve.png.
"""

from gemma_sft.commands.evaluate import RUN_OPTIONS, main
from gemma_sft.errors import run

__all__ = ["main"]

if __name__ == "__main__":
    run(main, **RUN_OPTIONS)
