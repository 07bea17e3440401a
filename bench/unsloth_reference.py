"""Unsloth's training speed on the same model, rows and tokens per step as bench/bench.py (a reference point).

Runs in its own environment: Unsloth pins its own TRL and datasets (unsloth 2026.10.9 wants trl<=1.15.0,
datasets<5), so install it apart from requirements.txt, e.g. `pip install unsloth==2026.10.9` in a fresh venv.
Uses the random checkpoint and Belle-like rows that `python bench/bench.py` builds under --work (it builds them
itself when missing). Unsloth's fast path: QLoRA r=16, alpha 32 on every attention and MLP projection of the
language model, LoRA dropout 0, its own gradient checkpointing and compiled kernels, TRL packing padding-free.

    python bench/bench.py --only ours unsloth --unsloth-pythonpath DIR   # both, one call, with the ratios
    python bench/unsloth_reference.py --max_length 8192 --out bench/results-unsloth.json   # this one alone

Figures are timed by bench.py's own `StepClock`: trained tokens over one window of the steps after the warm-up,
the GPU waited for only at its two ends, logging every bench.LOGGING_STEPS steps, as for ours.
"""

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def versions(*names: str) -> dict:
    """The installed versions of these packages (None where one is not installed as a distribution)."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/gemma-sft-bench"))
    parser.add_argument("--max_length", type=int, default=8192, help="tokens per packed row (= per optimizer step)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state figure")
    parser.add_argument("--optim", default="paged_adamw_32bit", help="the optimizer (bench.py passes our set-up's)")
    parser.add_argument("--model-config", default=None, help="architecture (default: bench.py's, gemma-3-4b-it)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results-unsloth.json"))
    args = parser.parse_args()

    started = time.time()
    import torch
    import unsloth  # first: it patches transformers, PEFT and TRL as they are imported
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastModel

    sys.path.insert(0, str(ROOT / "bench"))
    import bench

    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    model_config = Path(args.model_config).resolve() if args.model_config else bench.CONFIG
    checkpoint, data_file = bench.ensure_work_files(Path(args.work), model_config)

    model, processor = FastModel.from_pretrained(
        str(checkpoint), max_seq_length=args.max_length, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastModel.get_peft_model(
        model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
        finetune_mlp_modules=True, r=16, lora_alpha=32, lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=0,
    )  # fmt: skip
    tokenizer = getattr(processor, "tokenizer", processor)
    if not tokenizer.chat_template:  # Unsloth's loader can drop it for a checkpoint without a processor config
        tokenizer.chat_template = (ROOT / "chat_templates" / "gemma3.jinja").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines()]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
            tokenize=False,
        )
        for r in rows
    ]

    class Timer(TrainerCallback):
        def __init__(self):
            self.clock = bench.StepClock(args.warmup, args.steps, lambda state: state.num_input_tokens_seen)
            self.losses, self.first_step_at = [], None

        def on_step_begin(self, args_, state, control, **kwargs):
            self.clock.begin(state)
            self.first_step_at = self.first_step_at or time.time()

        def on_step_end(self, args_, state, control, **kwargs):
            self.clock.end(state)

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 4))

    timer = Timer()
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"text": texts}),
        callbacks=[timer],
        args=SFTConfig(
            output_dir="/tmp/bench-unsloth", dataset_text_field="text", packing=True, max_length=args.max_length,
            per_device_train_batch_size=1, gradient_accumulation_steps=1, learning_rate=2e-4, bf16=True,
            optim=args.optim, max_grad_norm=0.3, max_steps=args.steps, logging_steps=bench.LOGGING_STEPS,
            report_to="none", save_strategy="no", include_num_input_tokens_seen="non_padding", seed=0,
        ),
    )  # fmt: skip
    trainer.train()
    tok_s, warmup_excess, tokens_per_step = timer.clock.steady()
    card = torch.cuda.get_device_name()
    peak = next((v for k, v in bench.DENSE_BF16_PEAK.items() if k in card), 989e12)
    flops = bench.flops_per_token(json.loads(model_config.read_text()))
    result = {
        "setup": f"unsloth_{args.max_length}",
        "description": f"unsloth {unsloth.__version__}, one packed row of {args.max_length:,} tokens per step, "
        f"LoRA dropout 0, its gradient checkpointing, {args.optim}",
        "model": model_config.name.removesuffix(".config.json"),
        "card": card,
        "processes": 1,
        "tokens_per_s": round(tok_s),
        "tokens_per_s_per_gpu": round(tok_s),
        "tokens_per_step": tokens_per_step,
        "max_length": args.max_length,
        "startup_s": round(timer.first_step_at - started, 1),
        "warmup_excess_s": round(warmup_excess, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 1),
        "mfu_percent": round(100 * tok_s * flops / peak, 1),
        "versions": versions(
            "unsloth", "unsloth_zoo", "trl", "datasets", "peft", "bitsandbytes", "transformers", "torch"
        ),
        "losses": timer.losses,
        "warmup_step_s": [round(t, 3) for t in timer.clock.times],
        "warmup_step_tokens": timer.clock.tokens,
        "steady_window_s": round(timer.clock.window_s, 3),
        "steady_steps": args.steps - args.warmup,
        "steady_step_s": round(timer.clock.window_s / max(1, args.steps - args.warmup), 3),
    }
    Path(args.out).write_text(json.dumps([result], indent=2) + "\n", encoding="utf-8")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
