"""`gemma-sft VERB [ARGS]`: the installed command, one verb per entry script."""

import importlib
import sys

from gemma_sft.commands import MODULES, VERBS
from gemma_sft.errors import run

USAGE = "usage: gemma-sft {" + ",".join(VERBS) + "} [ARGS]\n\n" + "\n".join(f"  {v:<7} {h}" for v, h in VERBS.items())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    if verb not in MODULES:
        print(f"error: unknown verb '{verb}'\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"gemma_sft.commands.{MODULES[verb]}")
    run(lambda: module.main(rest), **module.RUN_OPTIONS)


if __name__ == "__main__":
    main()
