"""What `make train` runs: the mission recipe on one CUDA GPU (its low-memory form on a small card), the embedded 270M
demo on CPU otherwise."""

import shlex
import sys

MISSION = "recipes/gemma3_belle.yaml"
LOW_MEMORY = "recipes/gemma3_belle_low_memory.yaml"
DEMO = "recipes/gemma3_270m_belle_demo.yaml"
SINGLE_GPU = "accelerate_configs/single_gpu.yaml"
# The mission recipe reserves 18.5 GiB at its peak (H200, bench run 28); with the CUDA context that fits a 24 GB card
# (22-23.6 GiB usable) but not a 20 GB one, so cards under 22 GiB get the low-memory recipe.
MISSION_MIN_GIB = 22


def default_recipe(has_cuda: bool, gpu_gib: float = 0.0) -> str:
    if not has_cuda:
        return DEMO
    return MISSION if gpu_gib >= MISSION_MIN_GIB else LOW_MEMORY


def train_command(recipe: str | None, has_cuda: bool, gpu_gib: float = 0.0) -> list[str]:
    """On a GPU, accelerate with the one-GPU config (with several GPUs visible and no config, the Trainer would fall
    back to DataParallel); on CPU, plain Python (accelerate's bf16 default config would slow a CPU run 7x)."""
    recipe = recipe or default_recipe(has_cuda, gpu_gib)
    if has_cuda:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", SINGLE_GPU, "sft.py", recipe]
    return [sys.executable, "sft.py", recipe]


if __name__ == "__main__":
    import torch

    cuda = torch.cuda.is_available()
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    chosen = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None
    reason = f"a CUDA GPU with {gib:.0f} GiB" if cuda else "no CUDA GPU found: training on CPU"
    print(f"make train: {chosen or default_recipe(cuda, gib)} ({reason})", file=sys.stderr)
    print(shlex.join(train_command(chosen, cuda, gib)))
