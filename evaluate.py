"""`python evaluate.py --help` (or `gemma-sft eval`): the description, flags and code are in
gemma_sft/commands/evaluate.py; this script only runs it."""

from gemma_sft.commands.evaluate import RUN_OPTIONS, main
from gemma_sft.errors import run

__all__ = ["main"]

if __name__ == "__main__":
    run(main, **RUN_OPTIONS)
