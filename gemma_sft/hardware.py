"""The machine and the launch: what `make train` runs here (the mission recipe on one CUDA GPU, with as many layers
keeping their activations as the card's free memory allows, its low-memory form on a small card, the embedded 270M
demo on CPU), which adapter the verbs after it use, and the checks of a launch (precision, GPUs per process, FSDP and
ZeRO-3)."""

import os
import shlex
import sys
from pathlib import Path

from gemma_sft.errors import UserError

MISSION = "recipes/gemma3_belle.yaml"
LOW_MEMORY = "recipes/gemma3_belle_low_memory.yaml"
DEMO = "recipes/gemma3_270m_belle_demo.yaml"
SINGLE_GPU = "accelerate_configs/single_gpu.yaml"
# The mission recipe reserves about 8.3 GiB at its peak (README, Results); with the CUDA context and some margin
# that fits a 12 GB card (11.7 GiB usable) but not a 10 GB one, so smaller cards get the low-memory recipe.
MISSION_MIN_GIB = 11
# On a card with room to spare, some decoder layers keep their activations instead of recomputing them (kept_layers):
# the same arithmetic, about 0.8% faster per layer kept. The mission recipe reserves 8.3 GiB at its peak with every
# layer recomputed and about 0.8 GiB more per layer kept (0.77 on average from 4 to 19 layers, 0.83 at the worst
# point; docs/PERFORMANCE.md, The speed and memory curve), so a card keeps as many layers as fit beside that with
# HEADROOM_GIB to spare: one on a 12 GB card, about 15 on 24 GB, all 34 from 40 GB up.
MISSION_RESERVED_GIB = 8.3
KEPT_LAYER_GIB = 0.85
HEADROOM_GIB = 2.0  # the CUDA context, the allocator's fragmentation, a margin
MISSION_LAYERS = 34  # gemma-3-4b-it's decoder layers


def default_recipe(has_cuda: bool, gpu_gib: float = 0.0) -> str:
    if not has_cuda:
        return DEMO
    return MISSION if gpu_gib >= MISSION_MIN_GIB else LOW_MEMORY


def kept_layers_for(gpu_gib: float) -> int:
    """How many of the mission recipe's decoder layers keep their activations on a card with `gpu_gib` free."""
    room = gpu_gib - MISSION_RESERVED_GIB - HEADROOM_GIB
    return max(0, min(MISSION_LAYERS, int(room // KEPT_LAYER_GIB)))


def default_flags(has_cuda: bool, gpu_gib: float = 0.0) -> list[str]:
    """What `make train` adds to the recipe it picks (none to one the user names)."""
    kept = kept_layers_for(gpu_gib) if has_cuda and default_recipe(has_cuda, gpu_gib) == MISSION else 0
    return ["--kept_layers", str(kept)] if kept else []


def training_script(recipe: str | None, has_cuda: bool, gpu_gib: float = 0.0) -> list[str]:
    """sft.py and its arguments: the recipe the user names, as it is, or this machine's with its flags."""
    if recipe:
        return ["sft.py", recipe]
    return ["sft.py", default_recipe(has_cuda, gpu_gib), *default_flags(has_cuda, gpu_gib)]


def train_command(recipe: str | None, has_cuda: bool, gpu_gib: float = 0.0) -> list[str]:
    """On a GPU, accelerate with the one-GPU config (with several GPUs visible and no config, the Trainer would fall
    back to DataParallel); on CPU, plain Python (accelerate's bf16 default config would slow a CPU run 7x)."""
    script = training_script(recipe, has_cuda, gpu_gib)
    if has_cuda:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", SINGLE_GPU, *script]
    return [sys.executable, *script]


def trained_adapter(recipe: str | None, has_cuda: bool, gpu_gib: float = 0.0) -> str:
    """The output_dir that `make train` (with the same RECIPE) writes on this machine: the verbs after it default to
    that adapter."""
    import yaml

    path = recipe or default_recipe(has_cuda, gpu_gib)
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        values = {}
    return str(values.get("output_dir") or "outputs") if isinstance(values, dict) else "outputs"


def check_precision(training_args, model_args) -> None:
    """Gemma 3 overflows in fp16; bf16 needs hardware support."""
    import torch

    if getattr(training_args, "fp16", False) or model_args.dtype == "float16":
        raise UserError("fp16 overflows Gemma 3 (NaN losses): set bf16: true and dtype: bfloat16 instead")
    wants_bf16 = training_args.bf16 or model_args.dtype == "bfloat16"
    if wants_bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"bf16 is not supported by {torch.cuda.get_device_name()}: use an Ampere or newer GPU, "
            "or set bf16: false and dtype: float32 (slow, but correct)"
        )


def fsdp_launch() -> bool:
    """Whether `accelerate launch` started this process with an FSDP config (accelerate_configs/fsdp_qlora.yaml)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def zero3_launch() -> bool:
    """Whether `accelerate launch` started this process with ZeRO-3 (accelerate_configs/deepspeed_zero3.yaml)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def sharded_launch() -> bool:
    """Whether the model's weights are sharded across processes (FSDP or ZeRO-3)."""
    return fsdp_launch() or zero3_launch()


def check_processes(training_args) -> None:
    """Several processes must share one adapter through data parallelism. Checked on the processes set up as the
    Trainer sets them up (TrainingArguments.device), before minutes of loading data and weights."""
    from accelerate import DistributedType

    _ = training_args.device  # reading it sets the processes up (once), as the Trainer would
    state = training_args.distributed_state
    if state is not None and state.num_processes > 1 and state.distributed_type == DistributedType.NO:
        raise UserError(
            "several processes were launched but accelerate set up no data parallelism, so each would train its "
            "own adapter: on CPU pass --use_cpu true; on GPUs check CUDA_VISIBLE_DEVICES"
        )


def check_launch(model_args, training_args) -> None:
    """One GPU per process, and when the model is sharded (FSDP, ZeRO-3): GPUs, 4-bit weights in a float dtype, and
    under FSDP with checkpoints an optimizer whose state FSDP can save."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # the Trainer would fall back to nn.DataParallel
        raise UserError(
            f"{gpus} GPUs are visible to one process: for data parallelism launch `accelerate launch "
            f"--config_file accelerate_configs/multi_gpu.yaml --num_processes {gpus} sft.py ...`; "
            "for one GPU set CUDA_VISIBLE_DEVICES=0"
        )
    sharding = "FSDP" if fsdp_launch() else "DeepSpeed ZeRO-3" if zero3_launch() else None
    if sharding is None:
        return
    if not torch.cuda.is_available():
        raise UserError(
            f"{sharding} needs CUDA GPUs; on CPU, launch with `accelerate launch --multi_gpu --num_processes N` "
            "and pass --use_cpu true (data parallel over gloo)"
        )
    if model_args.load_in_4bit and model_args.bnb_4bit_quant_storage not in ("bfloat16", "float16", "float32"):
        config = "fsdp_qlora.yaml" if sharding == "FSDP" else "deepspeed_zero3.yaml"
        raise UserError(
            f"{sharding} shards floating-point tensors only: store the 4-bit weights in bf16 with "
            f"--bnb_4bit_quant_storage bfloat16 (see accelerate_configs/{config})"
        )
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    checkpoints = str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "no"
    if sharding == "FSDP" and checkpoints and any(tag in optim for tag in ("bnb", "8bit", "32bit")):
        # bitsandbytes keeps its state in a nested dict that FSDP's optimizer checkpointing cannot shard or restore
        raise UserError(
            f"FSDP checkpoints cannot hold the state of bitsandbytes' optimizer ({optim}): pass --optim adamw_torch "
            "(the same AdamW; the LoRA weights are small, so paging saves nothing), or --save_strategy no"
        )


def _machine() -> tuple[bool, float]:
    """Whether there is a CUDA GPU, and the GiB free on the first one: its memory less what other processes (a
    display, another job) hold, as nvidia-smi reports it (nothing subtracted where it cannot say)."""
    import torch

    if not torch.cuda.is_available():
        return False, 0.0
    properties = torch.cuda.get_device_properties(0)
    return True, properties.total_memory / 2**30 - _held_by_others_gib(f"GPU-{properties.uuid}")


def _held_by_others_gib(gpu: str) -> float:
    import subprocess

    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", gpu]
    try:
        return float(subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 0.0


def main(argv: list[str]) -> int:
    """`python -m gemma_sft.hardware [RECIPE]` trains with the chosen recipe and returns its exit status;
    `--print` only prints the command; `--adapter` prints the folder that training writes."""
    import subprocess

    only_print, adapter = "--print" in argv, "--adapter" in argv
    argv = [arg for arg in argv if arg not in ("--print", "--adapter")]
    cuda, gib = _machine()
    if adapter:
        print(trained_adapter(argv[0] if argv and argv[0] else None, cuda, gib))
        return 0
    chosen = argv[0] if argv and argv[0] else None
    reason = f"a CUDA GPU with {gib:.1f} GiB free" if cuda else "no CUDA GPU found: training on CPU"
    picked = shlex.join(training_script(chosen, cuda, gib)[1:])
    if not chosen and default_flags(cuda, gib):
        reason += f": room for {kept_layers_for(gib)} layers to keep their activations (faster, the same arithmetic)"
    print(f"make train: {picked} ({reason})", file=sys.stderr, flush=True)
    command = train_command(chosen, cuda, gib)
    if only_print:
        print(shlex.join(command))
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
