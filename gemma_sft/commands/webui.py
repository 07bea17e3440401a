"""A local web page to compare the base model and the adapter, side by side, on the same prompts.

    python webui.py --adapter outputs/gemma3-270m-belle-demo                 # then open http://127.0.0.1:7860
    python webui.py --adapter outputs/gemma3-4b-belle-qlora --port 8080
    python webui.py --adapter outputs/gemma3-270m-belle-demo --host 0.0.0.0  # reachable from other machines

One copy of the weights is loaded: the base answers come from the same model with the adapter switched off. Each
prompt is answered by the base model first, then by the adapter, both streamed, each pane keeping its own
conversation. The Report tab shows the adapter's evaluation (report.md and the loss curve) when it has one.
"""

import argparse
import os
import re
import socket
import time
from pathlib import Path

# Before gradio is imported anywhere: no usage statistics, no version check, nothing leaves the machine.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from gemma_sft import UserError

PANES = ("base", "adapter")
# report.md links its loss curve by a path relative to the adapter folder, which the page cannot serve as it is:
# the link is dropped from the markdown and the image shown under it instead.
LOCAL_IMAGE = re.compile(r"^!\[[^\]]*\]\((?!https?://)[^)]*\)\s*$", re.MULTILINE)
CSS = "#status { min-height: 1.5em; }"


def report_parts(adapter_dir: Path) -> tuple[str, Path | None]:
    """The report's markdown (or a note saying there is none) and the loss-curve PNG, when the folder has them."""
    report = adapter_dir / "report.md"
    curve = adapter_dir / "loss_curve.png"
    curve = curve if curve.is_file() else None
    if not report.is_file():
        note = (
            f"**No report for `{adapter_dir}` yet.** Training writes one when it has held-out rows; "
            f"`python evaluate.py --adapter {adapter_dir}` writes it (report.md, eval_report.json, loss_curve.png)."
        )
        return note, curve
    return LOCAL_IMAGE.sub("", report.read_text(encoding="utf-8")), curve


def check_port_free(host: str, port: int) -> None:
    """Fail in one line before the model loads, rather than with the web server's traceback after."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            reason = error.strerror or error
            raise UserError(f"cannot listen on {host}:{port} ({reason}); pass --port with another") from None


def build_page(model, tokenizer, adapter_dir: Path, max_new_tokens: int = 512):
    import gradio as gr

    from gemma_sft.inference.generate import build_messages, stream_reply

    def respond(prompt, system, new_tokens, temperature, top_p, base_history, adapter_history):
        prompt = (prompt or "").strip()
        histories = {"base": list(base_history or []), "adapter": list(adapter_history or [])}
        if not prompt:
            yield histories["base"], histories["adapter"], base_history, adapter_history, "", "Type a prompt first."
            return
        user = {"role": "user", "content": prompt}
        shown = {name: [*histories[name], user, {"role": "assistant", "content": ""}] for name in PANES}
        turn = len(histories["base"]) // 2 + 1
        started = time.monotonic()
        for name in PANES:
            status = f"Turn {turn}: {'the base model' if name == 'base' else 'the adapter'} is answering…"
            yield shown["base"], shown["adapter"], base_history, adapter_history, "", status
            messages = build_messages(system, histories[name], prompt)
            text = ""
            for piece in stream_reply(model, tokenizer, messages, use_base=name == "base",
                                      max_new_tokens=new_tokens, temperature=temperature, top_p=top_p):  # fmt: skip
                text += piece
                shown[name][-1] = {"role": "assistant", "content": text}
                yield shown["base"], shown["adapter"], base_history, adapter_history, "", status
            text = text.strip()
            shown[name][-1] = {"role": "assistant", "content": text or "(empty answer)"}
            histories[name] = [*histories[name], user, {"role": "assistant", "content": text}]
        status = f"Turn {turn} answered in {time.monotonic() - started:.1f} s."
        yield shown["base"], shown["adapter"], histories["base"], histories["adapter"], "", status

    def reset():
        return [], [], [], [], "", "Conversation cleared."

    report_text, curve = report_parts(adapter_dir)
    with gr.Blocks(title=f"base vs adapter: {adapter_dir.name}", analytics_enabled=False) as page:
        gr.Markdown(f"## Base vs adapter: `{adapter_dir}`")
        with gr.Tab("Chat"):
            with gr.Row():
                # no "share" button: it posts to the Hugging Face Hub
                panes = [gr.Chatbot(label=name, elem_id=f"{name}-chat", height=460, feedback_options=None,
                                    buttons=["copy", "copy_all"]) for name in PANES]  # fmt: skip
                base_chat, adapter_chat = panes
            # one line that grows: Gradio sends on Enter only for a one-line box (Shift+Enter still breaks the line)
            prompt = gr.Textbox(label="Prompt", placeholder="Enter sends, Shift+Enter for a new line", lines=1,
                                max_lines=8, elem_id="prompt")  # fmt: skip
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="send")
                clear = gr.Button("Reset", elem_id="reset")
            status = gr.Markdown("", elem_id="status")
            with gr.Accordion("System prompt and sampling", open=True):
                system = gr.Textbox(label="System prompt (optional)", lines=1, elem_id="system")
                with gr.Row():
                    new_tokens = gr.Slider(1, 2048, value=max_new_tokens, step=1, label="max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p (when sampling)")
        with gr.Tab("Report", elem_id="report-tab"):
            gr.Markdown(report_text, elem_id="report")
            if curve is not None:
                gr.Image(value=str(curve), label="training loss", type="filepath", interactive=False,
                         elem_id="loss-curve")  # fmt: skip

        base_state, adapter_state = gr.State([]), gr.State([])
        inputs = [prompt, system, new_tokens, temperature, top_p, base_state, adapter_state]
        outputs = [base_chat, adapter_chat, base_state, adapter_state, prompt, status]
        # one generation at a time over the whole page: the adapter switch is model-wide
        events = [trigger(respond, inputs, outputs, concurrency_id="generate", concurrency_limit=1)
                  for trigger in (send.click, prompt.submit)]  # fmt: skip
        # a pane's own trash button clears both conversations too, as Reset does: the panes stay one comparison
        for trigger in (clear.click, base_chat.clear, adapter_chat.clear):
            trigger(reset, None, outputs, cancels=events, queue=False)
    return page


def main(argv: list[str] | None = None) -> int:
    from gemma_sft import models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="output_dir of a finished sft.py run")
    parser.add_argument("--base", help="base model to put the adapter on (default: the one it was trained on)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max_new_tokens", type=int, default=512, help="the page's starting value")
    args = parser.parse_args(argv)

    adapter_dir = Path(args.adapter)
    models.read_adapter_recipe(adapter_dir)  # a missing or unfinished adapter fails here, before anything loads
    check_port_free(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the page has no authentication and anyone who can reach {args.host}:{args.port} can use it")
    print(f"loading {adapter_dir} ...", flush=True)
    model, tokenizer, _ = models.load_for_inference(adapter_dir, args.base)
    page = build_page(model, tokenizer, adapter_dir, args.max_new_tokens)
    page.queue(default_concurrency_limit=1)
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"open http://{shown_host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True,
                    show_error=True, footer_links=[], run_history=False, enable_monitoring=False, mcp_server=False,
                    ssr_mode=False, pwa=False, css=CSS)  # fmt: skip
    except OSError as error:  # the port was taken between the check above and now
        raise UserError(f"cannot listen on {args.host}:{args.port} ({error}); pass --port with another") from None
    return 0


# How the entry script reports an interruption or running out of memory (gemma_sft.errors.run)
RUN_OPTIONS = dict(on_interrupt="stopped")
