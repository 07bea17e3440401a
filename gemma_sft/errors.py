"""User mistakes as one line: the exception, the Hub's offline message, and the wrapper every entry script runs in."""

import sys

OUT_OF_MEMORY = "README.md, Troubleshooting, says what uses less"


class UserError(Exception):
    """A mistake in the user's recipe, flags or data: printed as one line, exit status 2, no traceback."""


def hub_error(what: str, name: str, exc: Exception, local: str, download: str) -> UserError:
    """Something could not be fetched from the Hugging Face Hub: one line with the reason and what to do offline."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return UserError(
        f"{what} '{name}': could not load it ({reason}). Offline? Download it on a connected machine (`{download}`) "
        f"and set {local}; in mainland China set HF_ENDPOINT to a Hub mirror; gated Gemma models also need "
        "`hf auth login`."
    )


def run(main, on_interrupt: str = "interrupted", on_out_of_memory: str = OUT_OF_MEMORY) -> None:
    """Run an entry script's main(): a user mistake prints one line and exits 2, running out of GPU memory prints one
    line with what to change and exits 1, Ctrl-C exits 130."""
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(on_interrupt, file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if type(error).__name__ != "OutOfMemoryError":  # torch's, matched by name: no torch import on every path
            raise
        what = next((line.strip() for line in str(error).splitlines() if line.strip()), "no details")
        print(f"error: out of GPU memory ({what.rstrip('.')}); {on_out_of_memory}", file=sys.stderr)
        sys.exit(1)
