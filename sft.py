"""`python sft.py --help` (or `gemma-sft train`): the description, flags and code are in
gemma_sft/commands/train.py; this script only runs it."""

from gemma_sft.commands.train import RUN_OPTIONS, main
from gemma_sft.errors import run

__all__ = ["main"]

if __name__ == "__main__":
    run(main, **RUN_OPTIONS)
