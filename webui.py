"""A local web page to compare the base model and the adapter, side by side, on the same prompts.

    python webui.py --adapter outputs/gemma3-270m-belle-demo                 # then open http://127.0.0.1:7860
    python webui.py --adapter outputs/gemma3-4b-belle-qlora --port 8080
    python webui.py --adapter outputs/gemma3-270m-belle-demo --host 0.0.0.0  # reachable from other machines

One copy of the weights is loaded: the base answers come from the same model with the adapter switched off. Each
prompt is answered by the base model first, then by the adapter, both streamed, each pane keeping its own
conversation. The Report tab shows the adapter's evaluation (report.md and the loss curve) when it has one.
"""

from gemma_sft.commands.webui import RUN_OPTIONS, main
from gemma_sft.errors import run

__all__ = ["main"]

if __name__ == "__main__":
    run(main, **RUN_OPTIONS)
