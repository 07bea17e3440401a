"""What `make train` runs: the mission recipe on one CUDA GPU (its low-memory form on a small card), the embedded 270M
demo on CPU otherwise."""

import shlex
import sys

MISSION = "recipes/gemma3_belle.yaml"
LOW_MEMORY = "recipes/gemma3_belle_low_memory.yaml"
DEMO = "recipes/gemma3_270m_belle_demo.yaml"
SINGLE_GPU = "accelerate_configs/single_gpu.yaml"
# The mission recipe reserves about 11 GiB at its peak (README, Results); with the CUDA context and some margin
# that fits a 16 GB card (14.5-15.6 GiB usable) but not a 12 GB one, so smaller cards get the low-memory recipe.
MISSION_MIN_GIB = 14


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


def main(argv: list[str]) -> int:
    """`python -m gemma_sft.hardware [RECIPE]` trains with the chosen recipe and returns its exit status;
    `--print` only prints the command."""
    import subprocess

    import torch

    only_print = "--print" in argv
    argv = [arg for arg in argv if arg != "--print"]
    cuda = torch.cuda.is_available()
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    chosen = argv[0] if argv and argv[0] else None
    reason = f"a CUDA GPU with {gib:.0f} GiB" if cuda else "no CUDA GPU found: training on CPU"
    print(f"make train: {chosen or default_recipe(cuda, gib)} ({reason})", file=sys.stderr, flush=True)
    command = train_command(chosen, cuda, gib)
    if only_print:
        print(shlex.join(command))
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
