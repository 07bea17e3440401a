"""End-to-end check of training on several GPUs, through sft.py exactly as a user launches it (needs 2 CUDA GPUs).

Trains the low-memory recipe (the mission job in 2 x 4,096-token rows per step, which split evenly over GPUs) for a
few steps on the benchmark's random gemma-3-4b-it and Belle-like rows (run bench/bench.py once first to build them)
three ways: one GPU, DDP on 2 GPUs, FSDP-QLoRA on 2 GPUs; the 2-GPU runs halve gradient accumulation so every run
takes the same global batch. Then, in a single process, it loads each
adapter through evaluate.py and checks that the adapters hold the same tensors, and prints the loss curves.
`zero3` is DeepSpeed ZeRO-3. `fsdp2_resumed` (`zero3_resumed`) is the FSDP (ZeRO-3) run stopped after its first
checkpoint (half the steps) and started again with the same command: its curve after the checkpoint must continue
`fsdp2`'s (`zero3`'s), not restart from an untrained adapter.

    python bench/scale_check.py [--steps 4] [--only 1gpu fsdp2 ...] [--sdpa] [--out bench/scale_check.json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench import ON_2, SAME_BATCH_ON_2  # noqa: E402  the one-GPU global batch on 2 GPUs, so the curves compare

WORK = Path("/tmp/gemma-sft-bench")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
RECIPE = "recipes/gemma3_belle_low_memory.yaml"
# sharding needs the 4-bit weights in a float dtype
SHARDED = [*SAME_BATCH_ON_2, "--bnb_4bit_quant_storage", "bfloat16"]
RUNS = {
    "1gpu": ([sys.executable], []),
    "ddp2": ([*LAUNCH, "--config_file", "accelerate_configs/multi_gpu.yaml", *ON_2], SAME_BATCH_ON_2),
    # FSDP cannot checkpoint bitsandbytes' optimizer state: torch's AdamW
    "fsdp2": (
        [*LAUNCH, "--config_file", "accelerate_configs/fsdp_qlora.yaml", *ON_2],
        [*SHARDED, "--optim", "adamw_torch"],
    ),
    "zero3": ([*LAUNCH, "--config_file", "accelerate_configs/deepspeed_zero3.yaml", *ON_2], SHARDED),
}
RUNS["fsdp2_resumed"] = RUNS["fsdp2"]
RUNS["zero3_resumed"] = RUNS["zero3"]


def interrupted_after_first_checkpoint(command: list[str], output_dir: Path, steps: int, env):
    """Train half the steps (one checkpoint), then leave only the checkpoint, as a run killed after it would."""
    first = [*command, "--max_steps", str(steps // 2)]  # the later flag wins
    proc = subprocess.run(first, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        for path in output_dir.iterdir():
            if not path.name.startswith("checkpoint-"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return proc


def adapter_tensors(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return {key: (tuple(tensor.shape), str(tensor.dtype)) for key, tensor in tensors.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="these runs only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "scale_check.json"))
    parser.add_argument(
        "--sdpa",
        action="store_true",
        help="sdpa attention and no Liger kernels: no Triton compilation (saving and resuming do not depend on them)",
    )
    args = parser.parse_args()
    checkpoint, data_file = WORK / "gemma-3-4b-it-random", WORK / "belle_like.jsonl"
    if not checkpoint.exists():
        print(f"error: {checkpoint} is missing: run python bench/bench.py --only ours first", file=sys.stderr)
        return 2
    common = ["--model_name_or_path", str(checkpoint), "--dataset_name", str(data_file), "--max_samples", "1000",
              "--eval_samples", "16", "--max_steps", str(args.steps), "--save_steps", "2", "--logging_steps", "1",
              "--eval_report", "false", "--report_to", "none"]  # fmt: skip
    if args.sdpa:
        common += ["--attn_implementation", "sdpa", "--use_liger_kernel", "false"]
    one_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    report = {}
    for name in args.only or list(RUNS):
        prefix, flags = RUNS[name]
        output_dir = WORK / f"scale-{name}"
        shutil.rmtree(output_dir, ignore_errors=True)
        command = [*prefix, "sft.py", RECIPE, *common, *flags, "--output_dir", str(output_dir)]
        print(f"== {name}: {' '.join(command)}", flush=True)
        env = one_gpu if name == "1gpu" else os.environ
        proc = None
        if name.endswith("_resumed"):
            proc = interrupted_after_first_checkpoint(command, output_dir, args.steps, env)
        if proc is None or proc.returncode == 0:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            report[name] = {"error": proc.stderr[-3000:]}
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        check = ["evaluate.py", "--adapter", str(output_dir), "--num_prompts", "1", "--max_new_tokens", "8"]
        evaluated = subprocess.run([sys.executable, *check], cwd=ROOT, capture_output=True, text=True, env=one_gpu)
        report[name] = {
            "losses": [round(h["loss"], 4) for h in history if "loss" in h],
            "tensors": adapter_tensors(output_dir),
            "checkpoints": sorted(p.name for p in output_dir.glob("checkpoint-*")),
            "evaluate_rc": evaluated.returncode,
            "evaluate_tail": (evaluated.stdout.strip() or evaluated.stderr.strip()).splitlines()[-6:],
        }
        Path(args.out).write_text(json.dumps(report, indent=1, default=list) + "\n", encoding="utf-8")
    reference = report.get("1gpu", {}).get("tensors")
    print("\n| run | losses | adapter tensors | same tensors as 1 GPU | checkpoints | evaluate.py |")
    print("|---|---|---|---|---|---|")
    for name, r in report.items():
        if "error" in r:
            print(f"| {name} | failed | | | | |")
            continue
        same = "no 1gpu run" if reference is None else r["tensors"] == reference
        print(
            f"| {name} | {r['losses']} | {len(r['tensors'])} | {same} | {r['checkpoints']} | "
            f"rc {r['evaluate_rc']}: {r['evaluate_tail'][-1] if r['evaluate_tail'] else ''} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
