"""Which recipe `make train` runs: the mission on a CUDA GPU, the embedded 270M demo otherwise."""

import sys

MISSION = "recipes/gemma3_belle.yaml"
DEMO = "recipes/gemma3_270m_belle_demo.yaml"


def default_recipe(has_cuda: bool | None = None) -> str:
    if has_cuda is None:
        import torch

        has_cuda = torch.cuda.is_available()
    return MISSION if has_cuda else DEMO


if __name__ == "__main__":
    recipe = default_recipe()
    reason = "a CUDA GPU is present" if recipe == MISSION else "no CUDA GPU found: running the CPU demo instead"
    print(f"make train: {recipe} ({reason})", file=sys.stderr)
    print(recipe)
