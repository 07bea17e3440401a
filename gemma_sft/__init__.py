"""Shared code for the Gemma 3 QLoRA recipes: recipe parsing, data, model loading and evaluation."""

import logging
import sys
from pathlib import Path

# bitsandbytes looks for an optional CPU kernel on the Hugging Face kernel hub at import and warns when it can't:
# its built-in CPU path is used instead, so the warning is only noise (and confusing offline).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

REPO_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """A mistake in the user's recipe, flags or data: printed as one line, exit status 2, no traceback."""


def run(main, on_interrupt: str = "interrupted") -> None:
    """Run an entry script's main(): a user mistake prints one line and exits 2, Ctrl-C exits 130."""
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(on_interrupt, file=sys.stderr)
        sys.exit(130)
