"""Training-throughput benchmark for the mission recipe on one CUDA GPU (make bench).

Builds the gemma-3-4b-it architecture (bench/gemma-3-4b-it.config.json) with random weights, writes Belle-like
rows (prompt ~55 and answer ~180 tokens, lognormal, Chinese text drawn from our bundled sample) and trains each
set-up below for a few steps through the same code path as sft.py (our data pipeline, TRL's SFTTrainer, PEFT,
bitsandbytes). Each set-up runs in its own process so memory peaks and kernel patches do not leak between them.

    python bench/bench.py                       # every set-up; results in bench/results.json and a table
    python bench/bench.py --only ours original  # a subset
    python bench/bench.py --only ours unsloth_8k ours_16k unsloth --unsloth-pythonpath DIR   # against Unsloth

Against Unsloth: `unsloth` and `unsloth_8k` run bench/unsloth_reference.py in Unsloth's own environment (it pins its
own TRL and datasets): another interpreter (--unsloth-python, e.g. a venv's bin/python) or this one with Unsloth's
packages on PYTHONPATH instead of ours (--unsloth-pythonpath, e.g. a `pip install --target` folder). Same random
checkpoint, rows and tokens per step as `ours` (8,192) and `ours_16k` (16,384); a second table gives ours over Unsloth
for each pair, and the results go to bench/results/DATE-CARD-ours-vs-unsloth.json.

Figures: trained tokens/s is the real tokens of the steps after the warm-up steps over their time, timed as one window
waited for only at its ends, logging every 5 steps as the recipes do (StepClock; padding that makes every packed row
one shape costs time and counts no tokens); start-up is model load plus everything
before the first step; warm-up extra is the time the warm-up steps took beyond their tokens at the steady rate
(compilation, autotuning); MFU counts 4 FLOPs per trained token per weight of the language model's linear layers
and its 262k-vocabulary head (forward + input-gradient backward; LoRA's own weight gradients, attention scores and
recomputation are not counted), against the card's dense bf16 peak from its datasheet; peak GiB is the most
memory tensors held, reserved GiB what the caching allocator held (what a card must have, plus the CUDA context).
"""

import argparse
import cProfile
import gc
import hashlib
import io
import json
import math
import os
import pstats
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "bench" / "gemma-3-4b-it.config.json"
MISSION = str(ROOT / "recipes" / "gemma3_belle.yaml")
# the same job as the mission recipe in two rows of 4,096 tokens (for cards under 11 GiB)
LOW_MEMORY = str(ROOT / "recipes" / "gemma3_belle_low_memory.yaml")
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # datasheet, SXM parts
MISSION_ROWS, MISSION_EPOCHS = 2000, 3
DATA_ROWS = 3000  # Belle-like rows written for the benchmarks
LOGGING_STEPS = 5  # the recipes' logging_steps: each log reads the loss on the host

DDP = ["--config_file", str(ROOT / "accelerate_configs" / "multi_gpu.yaml")]
FSDP = ["--config_file", str(ROOT / "accelerate_configs" / "fsdp_qlora.yaml")]
ZERO3 = ["--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml")]
SDPA_NO_LIGER = ["--attn_implementation", "sdpa", "--use_liger_kernel", "false"]
COMPILE = ["--torch_compile", "true"]
NO_FUSED = ["--fused_qlora", "false"]
GC_EVERY_2 = ["--gradient_checkpointing_kwargs", '{"every_n_layers": 2}']  # checkpointing every 2nd layer only
BF16_STORAGE = ["--bnb_4bit_quant_storage", "bfloat16"]  # FSDP shards only floating-point tensors
NO_DROPOUT = ["--lora_dropout", "0"]
ROWS_32K = ["--max_length", "32768", "--gradient_accumulation_steps", "1"]  # one row of 32,768 tokens per step
ROWS_8K = ["--max_length", "8192", "--pad_to_multiple_of", "8192"]  # one packed row of 8,192 tokens per step
ROWS_16K = ["--max_length", "16384", "--pad_to_multiple_of", "16384"]
# on the low-memory recipe: its rows until 2026-12-07 (8,192 x accumulation 2), for the set-ups measured on them
FORMER_LOW_MEMORY_ROWS = ROWS_8K
# a speed-first variant of the former low-memory recipe: no dropout, checkpointing every 2nd layer
FAST = [*FORMER_LOW_MEMORY_ROWS, *NO_DROPOUT, *GC_EVERY_2]
FP8 = ["--fp8_base_matmuls", "true"]
WAITING = ["--async_steps", "false", "--optim", "paged_adamw_32bit"]  # the step as it was
# the low-memory recipe on 2 GPUs: accumulation 1 instead of 2 keeps its tokens per optimizer step
ON_2, SAME_BATCH_ON_2 = ["--num_processes", "2"], ["--gradient_accumulation_steps", "1"]

# name -> (description, recipe, flags on top of it, accelerate launch flags or None for a plain process)
SETUPS = {
    "ours": (
        "gemma3_belle.yaml as shipped: one packed row of 8,192 tokens per step (padded to that one shape), "
        "flex_attention, liger, fused QLoRA, checkpointing with the MLP outputs kept",
        MISSION,
        [],
        None,
    ),
    "ours_8k": (
        "the mission recipe at 8,192 tokens per step, as shipped since 2026-12-07 (the name is kept for its results)",
        MISSION,
        ROWS_8K,
        None,
    ),
    "ours_waiting": (
        "as shipped, with the host waiting for the GPU each step as before (async_steps false, bitsandbytes' "
        "paged_adamw_32bit)",
        MISSION,
        WAITING,
        None,
    ),
    "ours_8k_waiting": (
        "as shipped, one packed row of 8,192 tokens per step, the host waiting for the GPU each step as before "
        "(async_steps false, paged_adamw_32bit)",
        MISSION,
        [*ROWS_8K, *WAITING],
        None,
    ),
    "ours_eager": (
        "as shipped, with the decoder stack issued from Python each step (cuda_graphs false)",
        MISSION,
        ["--cuda_graphs", "false"],
        None,
    ),
    "ours_8k_eager": (
        "as shipped, with one packed row of 8,192 tokens per step, issued from Python each step (cuda_graphs false)",
        MISSION,
        [*ROWS_8K, "--cuda_graphs", "false"],
        None,
    ),
    "ours_no_offload": (
        "as shipped, with the checkpointed layer inputs kept on the GPU (offload_activations false)",
        MISSION,
        ["--offload_activations", "false"],
        None,
    ),
    "ours_offload_kept": (
        "as shipped, the kept MLP outputs in pinned host memory too (offload_kept_outputs true)",
        MISSION,
        ["--offload_kept_outputs", "true"],
        None,
    ),
    "low_memory_keep_offloaded": (
        "low-memory recipe, the MLP outputs kept instead of recomputed and held in host memory with the layer inputs "
        "(keep_mlp_outputs true, offload_kept_outputs true)",
        LOW_MEMORY,
        ["--keep_mlp_outputs", "true", "--offload_kept_outputs", "true"],
        None,
    ),
    "ours_fp8": (
        "as shipped, with the frozen weights' matmuls in FP8 (fp8_base_matmuls true)",
        MISSION,
        FP8,
        None,
    ),
    "ours_compiled_block_masks": (
        "as shipped, flex_attention's block masks built through torch.compile as transformers builds them "
        "(block_masks_without_compile false): run after `ours` in one call, its warm-up extra is their compilation",
        MISSION,
        ["--block_masks_without_compile", "false"],
        None,
    ),
    "ours_16k": (
        "the mission recipe at 16,384 tokens per step, as shipped from 2026-11-28 to 2026-12-07",
        MISSION,
        ROWS_16K,
        None,
    ),
    "ours_16k_nodrop": (
        "ours_16k, lora_dropout 0",
        MISSION,
        [*ROWS_16K, *NO_DROPOUT],
        None,
    ),
    "ours_16k_gc2": (
        "ours_16k, checkpointing every 2nd layer only",
        MISSION,
        [*ROWS_16K, *GC_EVERY_2],
        None,
    ),
    "ours_16k_gc2_nodrop": (
        "ours_16k, checkpointing every 2nd layer only, lora_dropout 0",
        MISSION,
        [*ROWS_16K, *GC_EVERY_2, *NO_DROPOUT],
        None,
    ),
    "ours_gc2": ("as shipped, checkpointing every 2nd layer only", MISSION, GC_EVERY_2, None),
    # what `make train` adds on larger cards (gemma_sft/hardware.py); the counts of
    # 2026-12-07-h100-kept-layers-vs-unsloth-8k.json, whose ours_keep8/17/26/34 kept 4, 9, 14 and 19 language layers
    **{
        f"ours_keep{kept}": (
            f"as shipped, {kept} evenly spaced layers keep their activations (kept_layers {kept})",
            MISSION,
            ["--kept_layers", str(kept)],
            None,
        )
        for kept in (4, 9, 14, 16, 19, 34)
    },
    # the speed and memory curve at 16,384 tokens per step: one kept layer still fits 10 GiB there
    **{
        f"ours_16k_keep{kept}": (
            f"ours_16k, {kept} evenly spaced layers keep their activations (kept_layers {kept})",
            MISSION,
            [*ROWS_16K, "--kept_layers", str(kept)],
            None,
        )
        for kept in (1, 8, 17, 34)
    },
    "ours_keep_qkv": (
        "as shipped, the query, key and value projections' outputs kept through checkpointing too (keep_qkv_outputs)",
        MISSION,
        ["--keep_qkv_outputs", "true"],
        None,
    ),
    "ours_16k_keep_qkv": ("ours_16k with keep_qkv_outputs", MISSION, [*ROWS_16K, "--keep_qkv_outputs", "true"], None),
    "ours_16k_keep_qkv_offloaded": (
        "ours_16k with keep_qkv_outputs, every kept output in pinned host memory (offload_kept_outputs)",
        MISSION,
        [*ROWS_16K, "--keep_qkv_outputs", "true", "--offload_kept_outputs", "true"],
        None,
    ),
    "ours_plain_attention": (
        "as shipped, without the attention speed-ups (q/k norms through the stored layout, flex_attention backward "
        "with 8 warps)",
        MISSION,
        ["--qk_norm_in_stored_layout", "false", "--tuned_flex_attention", "false"],
        None,
    ),
    "ours_trl_head": (
        "as shipped, with TRL's own chunked output head (the logits projected again in the backward pass)",
        MISSION,
        ["--fused_output_head", "false"],
        None,
    ),
    "ours_trl_packing": (
        "as shipped, packed by TRL in batches of 1,000 samples (one part-filled row per batch)",
        MISSION,
        ["--pack_in_one_pass", "false"],
        None,
    ),
    "ours_recompute_mlp": (
        "as shipped, the MLP outputs recomputed too (keep_mlp_outputs false: full checkpointing)",
        MISSION,
        ["--keep_mlp_outputs", "false"],
        None,
    ),
    "ours_peft": ("as shipped, with PEFT's own QLoRA layers (fused_qlora false)", MISSION, NO_FUSED, None),
    "nodrop": ("as shipped, lora_dropout 0", MISSION, NO_DROPOUT, None),
    "ours_dropout_copy": (
        "as shipped, LoRA dropout by PEFT's module (a dropped copy of x)",
        MISSION,
        ["--lora_dropout_in_kernels", "false"],
        None,
    ),
    "ours_compile": ("as shipped + torch.compile of each decoder layer", MISSION, COMPILE, None),
    "low_memory": (
        "gemma3_belle_low_memory.yaml as shipped: packed rows of 4,096 tokens x accumulation 2, MLP outputs "
        "recomputed",
        LOW_MEMORY,
        [],
        None,
    ),
    "low_memory_eager": (
        "low-memory recipe, issued from Python each step (cuda_graphs false)",
        LOW_MEMORY,
        ["--cuda_graphs", "false"],
        None,
    ),
    "low_memory_no_offload": (
        "low-memory recipe, with the checkpointed layer inputs kept on the GPU (offload_activations false)",
        LOW_MEMORY,
        ["--offload_activations", "false"],
        None,
    ),
    "low_memory_static": (
        "low-memory recipe with rows of 8,192 tokens x accumulation 2, every row padded to 8,192 (one shape)",
        LOW_MEMORY,
        FORMER_LOW_MEMORY_ROWS,
        None,
    ),
    "low_memory_16k": (
        "low-memory recipe with rows of 16,384 tokens x accumulation 2, padded to that one shape",
        LOW_MEMORY,
        ["--max_length", "16384", "--gradient_accumulation_steps", "2", "--pad_to_multiple_of", "16384"],
        None,
    ),
    # Single levers on 8,192-token rows x accumulation 2 (the low-memory recipe until 2026-12-07), each against the
    # others.
    "original": (
        "original tool: batch 1 x accumulation 4, no packing, grad checkpointing, sdpa",
        LOW_MEMORY,
        ["--packing", "false", "--max_length", "1024", *SDPA_NO_LIGER],
        None,
    ),
    "original_apart": (
        "original tool's settings with each accumulated micro-batch run on its own (merge_micro_batches false)",
        LOW_MEMORY,
        ["--packing", "false", "--max_length", "1024", *SDPA_NO_LIGER, "--merge_micro_batches", "false"],
        None,
    ),
    "original_eager": (
        "original tool's settings with the decoder stack issued from Python each step (cuda_graphs false)",
        LOW_MEMORY,
        ["--packing", "false", "--max_length", "1024", *SDPA_NO_LIGER, "--cuda_graphs", "false"],
        None,
    ),
    "original_fast": (
        "original tool's batches (1 sample x accumulation 4, no packing) with the mission recipe's kernels",
        MISSION,
        ["--packing", "false", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"],
        None,
    ),
    "pack4k": ("packing 4,096 tokens per row, sdpa", LOW_MEMORY, ["--max_length", "4096", *SDPA_NO_LIGER], None),
    "pack8k": ("packing 8,192 tokens per row, sdpa", LOW_MEMORY, [*FORMER_LOW_MEMORY_ROWS, *SDPA_NO_LIGER], None),
    "pack8k_flex": (
        "packing 8,192 + flex_attention (per-sample block mask)",
        LOW_MEMORY,
        [*FORMER_LOW_MEMORY_ROWS, "--use_liger_kernel", "false"],
        None,
    ),
    "pack8k_liger": (
        "packing 8,192 + liger kernels, sdpa",
        LOW_MEMORY,
        [*FORMER_LOW_MEMORY_ROWS, "--attn_implementation", "sdpa"],
        None,
    ),
    "low_memory_peft": ("low-memory recipe with PEFT's own QLoRA layers", LOW_MEMORY, NO_FUSED, None),
    "low_memory_nogc": (
        "low-memory recipe without grad checkpointing",
        LOW_MEMORY,
        ["--gradient_checkpointing", "false"],
        None,
    ),
    "low_memory_nodrop": ("low-memory recipe, lora_dropout 0", LOW_MEMORY, NO_DROPOUT, None),
    "gc2": (
        "8k rows x 2, checkpointing every 2nd layer only",
        LOW_MEMORY,
        [*FORMER_LOW_MEMORY_ROWS, *GC_EVERY_2],
        None,
    ),
    "compile": (
        "8k rows x 2 + torch.compile of each decoder layer",
        LOW_MEMORY,
        [*FORMER_LOW_MEMORY_ROWS, *COMPILE],
        None,
    ),
    "compile_gc2": (
        "8k rows x 2 + torch.compile, checkpointing every 2nd layer only",
        LOW_MEMORY,
        [*FORMER_LOW_MEMORY_ROWS, *COMPILE, *GC_EVERY_2],
        None,
    ),
    "fast": (
        "8k rows, lora_dropout 0, checkpointing every 2nd layer",
        LOW_MEMORY,
        FAST,
        None,
    ),
    "fast_peft": ("as fast, with PEFT's own QLoRA layers", LOW_MEMORY, [*FAST, *NO_FUSED], None),
    "fast_16k": (
        "as fast, packed rows of 16,384 tokens x accumulation 2",
        LOW_MEMORY,
        [*FAST, "--max_length", "16384", "--gradient_accumulation_steps", "2"],
        None,
    ),
    "ours_32k": ("low-memory recipe with rows of 32,768 x accumulation 1 (not padded)", LOW_MEMORY, ROWS_32K, None),
    "ours_32k_static": (
        "low-memory recipe with rows of 32,768 x accumulation 1, padded to 32,768",
        LOW_MEMORY,
        [*ROWS_32K, "--pad_to_multiple_of", "32768"],
        None,
    ),
    "nodrop_32k_static": (
        "as ours_32k_static, lora_dropout 0",
        LOW_MEMORY,
        [*NO_DROPOUT, *ROWS_32K, "--pad_to_multiple_of", "32768"],
        None,
    ),
    "nodrop_32k": ("as ours_32k, lora_dropout 0", LOW_MEMORY, [*NO_DROPOUT, *ROWS_32K], None),
    "ours_static": (
        "8k rows x 2, each packed row padded to 8,192 tokens: one shape to compile",
        LOW_MEMORY,
        FORMER_LOW_MEMORY_ROWS,
        None,
    ),
    # Several GPUs, on the low-memory recipe's 4,096-token rows: accumulation 1 instead of 2 keeps the one-GPU tokens
    # per step (and so the loss curve). The mission recipe's one row per step cannot be split that way.
    "ours_ddp2": ("low-memory recipe, DDP on 2 GPUs, accumulation 1", LOW_MEMORY, SAME_BATCH_ON_2, [*DDP, *ON_2]),
    "ours_ddp2_static": (
        "as ours_ddp2, without DDP's per-step search for unused parameters (TRL's default for Gemma 3)",
        LOW_MEMORY,
        [*SAME_BATCH_ON_2, "--ddp_find_unused_parameters", "false"],
        [*DDP, *ON_2],
    ),
    "fast_ddp2": ("as fast, DDP on 2 GPUs, accumulation 1", LOW_MEMORY, [*FAST, *SAME_BATCH_ON_2], [*DDP, *ON_2]),
    "ours_fsdp1": (
        "low-memory recipe, FSDP-QLoRA on 1 GPU (the baseline for per-GPU memory)",
        LOW_MEMORY,
        BF16_STORAGE,
        [*FSDP, "--num_processes", "1"],
    ),
    "ours_fsdp2": (
        "low-memory recipe, FSDP-QLoRA on 2 GPUs (4-bit weights stored in bf16), accumulation 1",
        LOW_MEMORY,
        [*BF16_STORAGE, *SAME_BATCH_ON_2],
        [*FSDP, *ON_2],
    ),
    "ours_zero3_2": (
        "low-memory recipe, DeepSpeed ZeRO-3 on 2 GPUs (4-bit weights stored in bf16), accumulation 1",
        LOW_MEMORY,
        [*BF16_STORAGE, *SAME_BATCH_ON_2],
        [*ZERO3, *ON_2],
    ),
    # For memory on bigger architectures: sdpa and no Liger, so no Triton kernels to compile for new shapes.
    "sdpa_fsdp1": (
        "as ours_fsdp1 with sdpa, no Liger",
        LOW_MEMORY,
        [*BF16_STORAGE, *SDPA_NO_LIGER],
        [*FSDP, "--num_processes", "1"],
    ),
    "sdpa_fsdp2": (
        "as ours_fsdp2 with sdpa, no Liger",
        LOW_MEMORY,
        [*BF16_STORAGE, *SAME_BATCH_ON_2, *SDPA_NO_LIGER],
        [*FSDP, *ON_2],
    ),
}


# Unsloth (bench/unsloth_reference.py, in its own environment): name -> (tokens per packed row and optimizer step,
# our set-up it is compared with, at the same tokens per step). Not in the default list: it needs that environment.
# Unsloth trains with the optimizer of the set-up it is compared with.
UNSLOTH = {
    "unsloth": (16384, "ours_16k"),
    "unsloth_8k": (8192, "ours"),
}


def setup_optimizer(name: str) -> str:
    """The optimizer one of our set-ups trains with (its flags, else its recipe): Unsloth is given the same one."""
    from gemma_sft import config

    _, recipe, flags, _ = SETUPS[name]
    if "--optim" in flags:
        return flags[flags.index("--optim") + 1]
    return config.load_recipe(recipe)["optim"]


def gpus_needed(launcher: list[str] | None) -> int:
    """How many GPUs a set-up's accelerate launch flags ask for (a plain process: one)."""
    return int(launcher[launcher.index("--num_processes") + 1]) if launcher else 1


def linear_weights(config: dict) -> tuple[int, int]:
    """Weights of the language model's linear layers and of its output head."""
    t = config.get("text_config", config)  # a text-only architecture is its own text config
    h, inter, heads, kv, d = (
        t["hidden_size"],
        t["intermediate_size"],
        t["num_attention_heads"],
        t["num_key_value_heads"],
        t["head_dim"],
    )
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter
    return per_layer * t["num_hidden_layers"], h * t["vocab_size"]


def flops_per_token(config: dict) -> float:
    body, head = linear_weights(config)
    return 4.0 * (body + head)


# ---------------------------------------------------------------------------------------------------------------
# Set-up: random checkpoint and Belle-like data
# ---------------------------------------------------------------------------------------------------------------
def work_files(work: Path, model_config: Path) -> tuple[Path, Path]:
    """Where the random checkpoint of an architecture and the Belle-like rows live under the work folder."""
    return work / (model_config.name.removesuffix(".config.json") + "-random"), work / "belle_like.jsonl"


def ensure_work_files(work: Path, model_config: Path, tokenizer_dir: Path | None = None) -> tuple[Path, Path]:
    """The random checkpoint and the rows under the work folder, reused only when their stamps say they were written
    whole from this architecture and this bundled sample; otherwise built again (each written aside, then moved)."""
    checkpoint, data_file = work_files(work, model_config)
    work.mkdir(parents=True, exist_ok=True)
    data_inputs = {"sample_sha256": _sha256(ROOT / "data" / "belle_sample_zh.jsonl"), "rows": DATA_ROWS, "seed": 0}
    data_stamp = data_file.with_name(data_file.name + ".stamp.json")
    written = _read_stamp(data_stamp)
    if not (written and data_file.exists() and written == {**data_inputs, "sha256": _sha256(data_file)}):
        data_stamp.unlink(missing_ok=True)
        partial = data_file.with_name(data_file.name + ".partial")
        build_data(partial, data_inputs["rows"], data_inputs["seed"])
        partial.replace(data_file)
        data_stamp.write_text(json.dumps({**data_inputs, "sha256": _sha256(data_file)}), encoding="utf-8")
    config_sha256 = _sha256(model_config)
    checkpoint_stamp = checkpoint / "bench-stamp.json"
    written = _read_stamp(checkpoint_stamp)
    if not (written and written == {"config_sha256": config_sha256, "files": _sizes(checkpoint, checkpoint_stamp)}):
        if tokenizer_dir is None:
            from gemma_sft.models import embedded

            tokenizer_dir = embedded.tokenizer_dir()
        partial = checkpoint.with_name(checkpoint.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build_checkpoint(partial, Path(tokenizer_dir), model_config)
        stamp = {"config_sha256": config_sha256, "files": _sizes(partial)}
        (partial / checkpoint_stamp.name).write_text(json.dumps(stamp), encoding="utf-8")
        shutil.rmtree(checkpoint, ignore_errors=True)
        partial.rename(checkpoint)
    return checkpoint, data_file


def _sizes(folder: Path, *leaving_out: Path) -> dict:
    """Each file's size (a whole checkpoint is gigabytes: sizes catch a cut-short write without reading it all)."""
    return {p.name: p.stat().st_size for p in sorted(folder.glob("*")) if p.is_file() and p not in leaving_out}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_checkpoint(folder: Path, tokenizer_dir: Path, model_config: Path) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
    )

    raw = json.loads(model_config.read_text())
    raw.pop("architectures")
    text_only = raw.get("model_type") == "gemma3_text"  # the 270M and 1B have no vision tower
    torch.manual_seed(0)
    start = time.time()
    with torch.device("cuda"):
        if text_only:
            model = Gemma3ForCausalLM(Gemma3TextConfig(**raw)).to(torch.bfloat16)
        else:
            model = Gemma3ForConditionalGeneration(Gemma3Config(**raw)).to(torch.bfloat16)
    model.save_pretrained(folder)
    # this process then only starts the set-ups: its cached blocks (about 19 GiB for the 4B) would be taken from theirs
    del model
    torch.cuda.empty_cache()
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    print(f"random {model_config.name} checkpoint written to {folder} in {time.time() - start:.0f}s", flush=True)


def build_data(path: Path, rows: int, seed: int) -> None:
    """Belle-like rows: lognormal prompt/answer lengths, characters drawn from our bundled Chinese sample."""
    rng = random.Random(seed)
    sample = (ROOT / "data" / "belle_sample_zh.jsonl").read_text(encoding="utf-8")
    chars = [c for c in sample if "\u4e00" <= c <= "\u9fff" or c in "，。：；！？0123456789"]

    def text(mean: float) -> str:
        length = max(4, int(rng.lognormvariate(math.log(mean) - 0.18, 0.6)))
        return "".join(rng.choice(chars) for _ in range(length))

    lines = [
        json.dumps({"instruction": text(55), "input": "", "output": text(180)}, ensure_ascii=False)
        for _ in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# One set-up, in this process
# ---------------------------------------------------------------------------------------------------------------
def run_one(name: str, checkpoint: Path, data_file: Path, steps: int, warmup: int, model_config: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from gemma_sft import config, data, models
    from gemma_sft.patches import async_steps
    from gemma_sft.trainer import build_trainer

    started = time.time()
    profile_to = os.environ.get("BENCH_PROFILE_DIR")  # the last step's profile (GPU kernels, host side) goes there
    # the first step under cProfile (where the warm-up's compilation goes); it slows that step, so a run of its own
    first_step_to = os.environ.get("BENCH_PROFILE_FIRST_DIR")
    _, recipe, flags, _ = SETUPS[name]
    parsed = config.parse(
        [recipe, *flags, "--model_name_or_path", str(checkpoint), "--dataset_name", str(data_file),
         "--output_dir", f"/tmp/bench-{name}", "--max_steps", str(steps), "--report_to", "none",
         "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", str(LOGGING_STEPS),
         "--eval_samples", "1", "--overwrite_output_dir", "true"]
    )  # fmt: skip
    training_args, model_args, resolved = parsed.training, parsed.model, parsed.resolved
    training_args.include_num_input_tokens_seen = "non_padding"
    tokenizer = models.load_tokenizer(str(checkpoint), training_args.chat_template_path)
    prepared = data.prepare_from_settings(resolved, tokenizer)
    prepared.eval = []

    collecting = {"since": 0.0, "seconds": 0.0}  # Python's garbage collector: time inside collections

    def on_collection(phase, info):
        if phase == "start":
            collecting["since"] = time.perf_counter()
        else:
            collecting["seconds"] += time.perf_counter() - collecting["since"]

    gc.callbacks.append(on_collection)

    class Timer(TrainerCallback):
        """The warm-up steps' times and tokens and the steady window (StepClock); for every step its time in garbage
        collection, the caching allocator's retries (freeing its cache and synchronizing to satisfy an allocation)
        and its new CUDA graphs, to explain slow steps. A profiled step is waited for at both ends."""

        def __init__(self):
            self.clock = StepClock(warmup, steps, self.tokens_seen)
            self.losses, self.first_step_at, self.trainer = [], None, None
            self.gc_seconds, self.alloc_retries, self.captures = [], [], []
            self.kernels_at_start = self.first_step_kernels = None  # with --empty-caches (cached_kernels)
            self._gc = self._retries = self._profile_t0 = 0

        def tokens_seen(self, state) -> int:
            async_steps.settle(self.trainer)  # figures async_steps keeps on the GPU
            return state.num_input_tokens_seen

        def on_step_begin(self, args, state, control, **kwargs):
            if (profile_to and state.global_step == steps - 2) or (first_step_to and state.global_step == 0):
                self.python_profile = cProfile.Profile()  # Python's own view of the host
                self.python_profile.enable()
            if profile_to and state.global_step in (steps - 2, steps - 1):
                torch.cuda.synchronize()
                self._profile_t0 = time.perf_counter()
            if profile_to and state.global_step == steps - 1:
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
                self.profiler.start()
            if state.global_step == 0:
                self.kernels_at_start = cached_kernels()
            self.clock.begin(state)
            self._gc, self._retries = collecting["seconds"], torch.cuda.memory_stats().get("num_alloc_retries", 0)
            if self.first_step_at is None:
                self.first_step_at = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            self.clock.end(state)
            if state.global_step == 1 and self.kernels_at_start is not None:
                self.first_step_kernels = sorted(path.stem for path in cached_kernels() - self.kernels_at_start)
            self.gc_seconds.append(round(collecting["seconds"] - self._gc, 3))
            self.alloc_retries.append(torch.cuda.memory_stats().get("num_alloc_retries", 0) - self._retries)
            self.captures.append(graph_captures(kwargs["model"]) - sum(self.captures))  # new CUDA graphs this step
            profiled = getattr(self, "python_profile", None) is not None or getattr(self, "profiler", None) is not None
            if profiled:
                torch.cuda.synchronize()
                seconds = time.perf_counter() - self._profile_t0 if self._profile_t0 else self.clock.times[-1]
            if getattr(self, "python_profile", None) is not None:
                self.python_profile.disable()
                if state.global_step == 1 and first_step_to:
                    path = Path(first_step_to) / f"python-first-step-{name}.txt"
                else:
                    path = Path(profile_to) / f"python-{name}.txt"
                write_python_profile(self.python_profile, seconds, path)
                self.python_profile = None
            if getattr(self, "profiler", None) is not None:
                self.profiler.stop()
                write_profile(self.profiler, seconds, Path(profile_to) / f"profile-{name}.txt")
                self.profiler = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 4))

    timer = Timer()
    torch.cuda.reset_peak_memory_stats()  # reserved memory's peak as well
    trainer = build_trainer(training_args, model_args, prepared, tokenizer, parsed.speed, [timer])
    timer.trainer = trainer
    trainer.train()
    processes = trainer.accelerator.num_processes
    if not trainer.is_world_process_zero():
        return {}
    tok_s, warmup_excess, tokens_per_step = timer.clock.steady()
    card = torch.cuda.get_device_name()
    peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in card), 989e12)
    raw = json.loads(model_config.read_text())
    mission_tokens = (
        MISSION_EPOCHS * sum(len(r["input_ids"]) for r in prepared.train) * MISSION_ROWS / len(prepared.train)
    )
    mission_s = timer.first_step_at - started + warmup_excess + mission_tokens / tok_s
    graphs = {}
    # CUDA graphs: steps that replay run at one rate, and each new batch shape costs a capture once. A batch is padded
    # to its longest row, so a job meets at most one shape per padded row length (per batch size).
    # The steady window replays (a capture inside it would show in step_captures); the warm-up steps hold the captures.
    times, tokens = timer.clock.times, timer.clock.tokens
    timed = list(zip(times, tokens, timer.captures))
    if sum(timer.captures) and times:
        replay_rate = tok_s
        captured = [max(0.0, t - n / replay_rate) / c for t, n, c in timed[1:] if c]
        capture_s = statistics.mean(captured) if captured else 0.0
        multiple = training_args.pad_to_multiple_of or 1
        shapes = len({-(-len(r["input_ids"]) // multiple) for r in prepared.train})
        first_step = times[0] - tokens[0] / replay_rate  # its capture and the first call's set-up
        mission_s = (
            timer.first_step_at - started + first_step + mission_tokens / replay_rate + (shapes - 1) * capture_s
        )
        graphs = {"graph_captures": sum(timer.captures), "step_captures": timer.captures,
                  "capture_s": round(capture_s, 2), "mission_shapes": shapes}  # fmt: skip
    return {
        "setup": name,
        "description": SETUPS[name][0],
        "model": model_config.name.removesuffix(".config.json"),
        "card": card,
        "processes": processes,
        "tokens_per_s": round(tok_s),  # all processes together: the Trainer sums tokens seen across ranks
        "tokens_per_s_per_gpu": round(tok_s / processes),
        "tokens_per_step": tokens_per_step,
        "max_length": training_args.max_length,
        "startup_s": round(timer.first_step_at - started, 1),
        "warmup_excess_s": round(warmup_excess, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 1),
        "mfu_percent": round(100 * tok_s / processes * flops_per_token(raw) / peak, 1),
        "losses": timer.losses,
        "warmup_step_s": [round(t, 3) for t in times],
        "warmup_step_tokens": tokens,
        "steady_window_s": round(timer.clock.window_s, 3),
        "steady_steps": steps - warmup,
        "steady_step_s": round(timer.clock.window_s / max(1, steps - warmup), 3),
        "step_gc_s": timer.gc_seconds,
        "step_alloc_retries": timer.alloc_retries,
        "compile_s": compile_seconds(),
        # with --empty-caches: what the first step compiled itself (Triton names its cubin files after the kernel)
        "first_step_kernels_compiled": None if timer.first_step_kernels is None else len(timer.first_step_kernels),
        "first_step_kernel_names": timer.first_step_kernels,
        "mission_tokens": round(mission_tokens),
        "mission_wall_s": round(mission_s),
        **graphs,
    }


class StepClock:
    """Each warm-up step timed on its own (the GPU waited for at both ends: compilation, captures), then the steady
    steps as one window, waited for only at its two ends. A wait inside the window would leave the GPU idle while the
    host prepares the next step, and hide what a real run gains when the host queues steps ahead (async_steps), so
    the window is timed as a user's run goes: the host free, logging at the recipes' interval (LOGGING_STEPS).
    `read_tokens(state)` gives the trained tokens so far, brought up to date (it may wait for the GPU)."""

    def __init__(self, warmup: int, steps: int, read_tokens):
        self.warmup, self.steps, self.read_tokens = warmup, steps, read_tokens
        self.times, self.tokens = [], []  # the warm-up steps'
        self.window_s = self.window_tokens = None
        self._t0 = self._seen = 0

    def begin(self, state) -> None:
        import torch

        if state.global_step < self.warmup or (state.global_step == 0 and self.warmup == 0):
            torch.cuda.synchronize()
            self._t0, self._seen = time.perf_counter(), self.read_tokens(state)

    def end(self, state) -> None:
        import torch

        if state.global_step <= self.warmup or state.global_step >= self.steps:
            torch.cuda.synchronize()
            now, seen = time.perf_counter(), self.read_tokens(state)
            if state.global_step <= self.warmup:
                self.times.append(now - self._t0)
                self.tokens.append(seen - self._seen)
                if state.global_step == self.warmup:  # the window starts here
                    self._t0, self._seen = now, seen
            if state.global_step >= self.steps:
                self.window_s, self.window_tokens = now - self._t0, seen - self._seen

    def steady(self) -> tuple[float, float, int]:
        """Tokens/s of the steady window, the warm-up steps' time beyond that rate, and the tokens per steady step."""
        return steady_figures(self.times, self.tokens, self.window_s, self.window_tokens, self.steps - self.warmup)


def steady_figures(
    times: list[float], tokens: list[int], window_s: float, window_tokens: int, window_steps: int
) -> tuple[float, float, int]:
    """Tokens/s of the steady window, the warm-up steps' time beyond that rate (compilation and other first-step
    costs), and the mean tokens per steady step. Rows of different lengths (the last, part-filled row of each
    packing batch) weigh as much as they take."""
    tok_s = window_tokens / window_s
    warmup_excess = sum(max(0.0, t - n / tok_s) for t, n in zip(times, tokens))
    return tok_s, warmup_excess, round(window_tokens / max(1, window_steps))


def compile_seconds() -> dict:
    """Seconds torch.compile spent, by phase (flex_attention and its block masks are compiled on first use)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return {name: round(float(value), 1) for name, value in zip(names, values) if float(value) >= 0.5}


def graph_captures(model) -> int:
    """How many batch shapes the model's CUDA graphs (gemma_sft/patches/cuda_graphs.py) have captured so far."""
    from gemma_sft.patches.cuda_graphs import GraphedStack

    stacks = [m.__dict__.get("forward") for m in model.modules()]
    return sum(len(stack.captured) for stack in stacks if isinstance(stack, GraphedStack))


def write_profile(profiler, step_seconds: float, path: Path) -> None:
    """One optimizer step: GPU kernel time by kernel and how busy the GPU was, then the host side (operators by their
    own CPU time, kernel launches), to see what keeps the GPU waiting."""
    import torch

    events = profiler.key_averages()
    # kernels only: operators also carry the device time of the kernels they launched
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    host = sum(e.self_cpu_time_total for e in events) / 1e6
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"step {step_seconds:.3f} s, GPU kernels {busy:.3f} s ({100 * busy / step_seconds:.0f}% busy), "
        f"{launches:,} kernel launches, host operator time {host:.3f} s\n\n"
        + events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
        + "\n\nHost side, by own CPU time:\n\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90)
        + "\n\nOperators by input shapes, by their own GPU time:\n\n"
        + profiler.key_averages(group_by_input_shape=True).table(
            sort_by="self_device_time_total", row_limit=70, max_name_column_width=50, max_shapes_column_width=90
        )
    )


def write_python_profile(profile, step_seconds: float, path: Path) -> None:
    """One optimizer step under cProfile: the Python functions the host spends its time in (own and cumulative)."""
    text = io.StringIO()
    text.write(f"step {step_seconds:.3f} s under cProfile (its overhead included)\n\n")
    for order in ("tottime", "cumulative"):
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(45)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    lines = [
        "| set-up | GPUs | tokens/s | tokens/s/GPU | tokens/step | start-up s | warm-up extra s | peak GiB | "
        "reserved GiB | MFU % | mission wall s | first -> last loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setup']} | | failed: {r['error'][:60]} | | | | | | | | | |")
            continue
        loss = f"{r['losses'][0]} -> {r['losses'][-1]}" if r["losses"] else ""
        lines.append(
            f"| {r['setup']} | {r['processes']} | {r['tokens_per_s']:,} | {r['tokens_per_s_per_gpu']:,} | "
            f"{r['tokens_per_step']:,} | {r['startup_s']} | {r.get('warmup_excess_s', '')} | {r['peak_gib']} | "
            f"{r.get('peak_reserved_gib', '')} | {r['mfu_percent']} | {r.get('mission_wall_s', 0):,} | {loss} |"
        )
    return "\n".join(lines)


def against_unsloth(results: list[dict]) -> list[tuple[dict, dict]]:
    """Pair each Unsloth result with our set-up at the same tokens per step; fill in Unsloth's mission-job estimate
    (computed as ours: start-up + warm-up extra + the job's tokens at the steady rate) and ours over Unsloth."""
    by_name = {r["setup"]: r for r in results if "error" not in r}
    pairs = []
    for name, (_, ours_name) in UNSLOTH.items():
        theirs, ours = by_name.get(name), by_name.get(ours_name)
        if theirs is None:
            continue
        donor = ours or next((r for r in by_name.values() if "mission_tokens" in r), {})  # the job's tokens
        mission_tokens = donor.get("mission_tokens")
        if mission_tokens:
            theirs["mission_tokens"] = mission_tokens
            theirs["mission_wall_s"] = round(
                theirs["startup_s"] + theirs["warmup_excess_s"] + mission_tokens / theirs["tokens_per_s"]
            )
        if ours is None:
            continue
        ratios = {
            "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "peak_gib": ours["peak_gib"] / theirs["peak_gib"],
            "startup_and_warmup_s": (ours["startup_s"] + ours["warmup_excess_s"])
            / (theirs["startup_s"] + theirs["warmup_excess_s"]),
            "mission_wall_s": ours["mission_wall_s"] / theirs["mission_wall_s"] if mission_tokens else None,
        }
        theirs["ours_over_unsloth"] = {"ours": ours_name, **{k: v and round(v, 3) for k, v in ratios.items()}}
        pairs.append((ours, theirs))
    return pairs


def unsloth_table(pairs: list[tuple[dict, dict]], date: str) -> str:
    """Ours against Unsloth: both rows and their ratio for each tokens-per-step, naming the card(s) and the date."""
    cards = sorted({r["card"] for pair in pairs for r in pair})
    lines = [
        f"Ours against Unsloth, {' and '.join(cards)}, {date} (one machine, one call; same random checkpoint, rows "
        "and tokens per step; ratio = ours / Unsloth):",
        "",
        "| tokens per step | set-up | tokens/s | peak GiB (reserved) | start-up + warm-up extra s | mission job s |",
        "|---|---|---|---|---|---|",
    ]
    for ours, theirs in pairs:
        n = f"{UNSLOTH[theirs['setup']][0]:,}"
        for r in (ours, theirs):
            lines.append(
                f"| {n} | {r['setup']} | {r['tokens_per_s']:,} | {r['peak_gib']} ({r['peak_reserved_gib']}) | "
                f"{r['startup_s']} + {r['warmup_excess_s']} | {r.get('mission_wall_s', '')} |"
            )
        q = theirs["ours_over_unsloth"]
        mission = f"{q['mission_wall_s']:.2f}x" if q["mission_wall_s"] else ""
        lines.append(
            f"| {n} | **ours / Unsloth** | **{q['tokens_per_s']:.2f}x** | {q['peak_gib']:.2f}x | "
            f"{q['startup_and_warmup_s']:.2f}x | {mission} |"
        )
    return "\n".join(lines)


def card_slug(card: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', for file names."""
    found = re.search(r"\b([A-Z]{1,2}\d{2,3}[A-Z]?|RTX \d{4}|\d{4})\b", card.removeprefix("NVIDIA "))
    return (found.group(1) if found else card).lower().replace(" ", "-")


def cached_kernels() -> set[Path] | None:
    """The compiled GPU kernels (cubin files) in the caches TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR name (as
    --empty-caches sets them); None where neither is set, since the default caches' places are not looked up and a
    count of nothing would read as nothing compiled."""
    folders = [folder for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR") if (folder := os.environ.get(name))]
    if not folders:
        return None
    return {path for folder in folders for path in Path(folder).rglob("*.cubin")}


def empty_caches(folder: Path) -> dict:
    """Environment variables that point the kernel caches at new, empty folders: Triton's and TorchInductor's, and
    for Unsloth its generated modules (UNSLOTH_COMPILE_LOCATION, else `unsloth_compiled_cache` in the working folder)
    and its saved torch.compile artifacts (UNSLOTH_MEGA_CACHE_DIR, else ~/.cache/unsloth/mega_cache), which a later
    Unsloth process would otherwise load."""
    shutil.rmtree(folder, ignore_errors=True)
    env = {
        "TRITON_CACHE_DIR": folder / "triton",
        "TORCHINDUCTOR_CACHE_DIR": folder / "inductor",
        "UNSLOTH_COMPILE_LOCATION": folder / "unsloth_compiled_cache",
        "UNSLOTH_MEGA_CACHE_DIR": folder / "unsloth_mega_cache",
    }
    for path in env.values():
        path.mkdir(parents=True)
    return {name: str(path) for name, path in env.items()}


def run_process(name: str, command: list[str], env: dict, out: Path) -> dict:
    """One set-up in its own process: its RESULT line, or its last error line (the error output kept beside out)."""
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if found:
        return json.loads(found[-1][7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    out.with_name(f"{name}.stderr.txt").write_text(proc.stderr[-20000:], encoding="utf-8")
    print(proc.stderr[-3000:], file=sys.stderr)
    return {"setup": name, "error": tail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(SETUPS) + sorted(UNSLOTH), help="run these set-ups only")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per set-up")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state figure")
    parser.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/gemma-sft-bench"))
    parser.add_argument(
        "--model-config",
        default=str(CONFIG),
        help="architecture to build with random weights (default: gemma-3-4b-it; bench/gemma-3-270m.config.json for "
        "the 270M's speed, bench/gemma-3-12b-it.config.json for FSDP memory scaling)",
    )
    parser.add_argument("--tokenizer", help="folder with the Gemma 3 tokenizer (default: the embedded one)")
    parser.add_argument(
        "--out",
        help="results file (default: bench/results.json; with an Unsloth set-up "
        "bench/results/DATE-CARD-ours-vs-unsloth.json)",
    )
    parser.add_argument("--unsloth-python", default=sys.executable, help="interpreter of Unsloth's environment")
    parser.add_argument(
        "--unsloth-pythonpath",
        help="PYTHONPATH for the Unsloth set-ups, instead of this environment's (a folder Unsloth was installed into "
        "with pip install --target)",
    )
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="the date the results are named with")
    parser.add_argument(
        "--empty-caches",
        action="store_true",
        help="each set-up starts on empty kernel caches of its own (Triton's, TorchInductor's and Unsloth's, under "
        "WORK/caches), so that every warm-up in one call is a first run's",
    )
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one set-up in this process
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    work = Path(args.work)
    model_config = Path(args.model_config).resolve()
    checkpoint, data_file = work_files(work, model_config)
    if args.run:
        result = run_one(args.run, checkpoint, data_file, args.steps, args.warmup, model_config)
        if result:  # rank 0 only
            print("RESULT " + json.dumps(result), flush=True)
        return 0

    names = args.only or list(SETUPS)
    card = torch.cuda.get_device_name()
    if args.out:
        out = Path(args.out)
    elif any(name in UNSLOTH for name in names):
        out = ROOT / "bench" / "results" / f"{args.date}-{card_slug(card)}-ours-vs-unsloth.json"
    else:
        out = ROOT / "bench" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_work_files(work, model_config, args.tokenizer and Path(args.tokenizer))
    results = []
    for name in names:
        environment = {**os.environ, **(empty_caches(work / "caches" / name) if args.empty_caches else {})}
        one_gpu = {**environment, "CUDA_VISIBLE_DEVICES": environment.get("CUDA_VISIBLE_DEVICES", "0")}
        common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--work", str(work),
                  "--model-config", str(model_config)]  # fmt: skip
        if name in UNSLOTH:
            tokens = UNSLOTH[name][0]
            print(f"== {name}: Unsloth (bench/unsloth_reference.py), {tokens:,} tokens per step", flush=True)
            command = [args.unsloth_python, str(ROOT / "bench" / "unsloth_reference.py"), "--max_length",
                       str(tokens), "--optim", setup_optimizer(UNSLOTH[name][1]), *common,
                       "--out", str(work / f"{name}.json")]  # fmt: skip
            env = {**one_gpu, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
            if args.unsloth_pythonpath:
                env["PYTHONPATH"] = args.unsloth_pythonpath
            results.append({**run_process(name, command, env, out), "setup": name})
        else:
            launcher = SETUPS[name][3]
            prefix = [sys.executable] if launcher is None else [sys.executable, "-m", "accelerate.commands.launch",
                                                                 *launcher]  # fmt: skip
            print(f"== {name}: {SETUPS[name][0]}", flush=True)
            gpus = gpus_needed(launcher)
            if torch.cuda.device_count() < gpus:
                results.append({"setup": name, "error": f"needs {gpus} GPUs"})
                continue
            command = [*prefix, __file__, "--run", name, *common]
            results.append(run_process(name, command, environment if gpus > 1 else one_gpu, out))
        pairs = against_unsloth(results)
        print(table(results[-1:]).splitlines()[-1], flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")  # kept if cut short
    print("\n" + table(results))
    if pairs:
        print("\n" + unsloth_table(pairs, args.date))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
