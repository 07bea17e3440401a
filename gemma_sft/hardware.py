"""What `make train` runs: the mission recipe on one CUDA GPU, the embedded 270M demo on CPU otherwise."""

import shlex
import sys

MISSION = "recipes/gemma3_belle.yaml"
DEMO = "recipes/gemma3_270m_belle_demo.yaml"
SINGLE_GPU = "accelerate_configs/single_gpu.yaml"


def default_recipe(has_cuda: bool) -> str:
    return MISSION if has_cuda else DEMO


def train_command(recipe: str | None, has_cuda: bool) -> list[str]:
    """On a GPU, accelerate with the one-GPU config (with several GPUs visible and no config, the Trainer would fall
    back to DataParallel); on CPU, plain Python (accelerate's bf16 default config would slow a CPU run 7x)."""
    recipe = recipe or default_recipe(has_cuda)
    if has_cuda:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", SINGLE_GPU, "sft.py", recipe]
    return [sys.executable, "sft.py", recipe]


if __name__ == "__main__":
    import torch

    cuda = torch.cuda.is_available()
    chosen = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None
    reason = "a CUDA GPU is present" if cuda else "no CUDA GPU found: training on CPU"
    print(f"make train: {chosen or default_recipe(cuda)} ({reason})", file=sys.stderr)
    print(shlex.join(train_command(chosen, cuda)))
