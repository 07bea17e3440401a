"""Serve a trained adapter behind an OpenAI-compatible endpoint (chat completions, streamed or not).

    python export.py --adapter outputs/gemma3-270m-belle-demo --output outputs/gemma3-270m-belle-demo-gguf
    python serve.py --adapter outputs/gemma3-270m-belle-demo          # http://127.0.0.1:8000/v1
    python serve.py --adapter outputs/gemma3-4b-belle-qlora --engine vllm [--merged DIR]   # CUDA GPU: vLLM's command

llama.cpp (llama-cpp-python's server) runs the adapter's GGUF export (--gguf, default ADAPTER-gguf) on any machine.
The served model name, the context length (the max_length it was trained with) and the chat template come from the
adapter's folder; the export must carry the same template. Answers end at <end_of_turn>. One request runs at a
time, the others wait their turn. --engine vllm prints the vLLM command lines for a CUDA GPU instead (vLLM is not
installed by this project), after checking a merged folder's layout against vLLM's and transformers' loaders.
"""

import argparse
import os
from pathlib import Path

from gemma_sft.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from gemma_sft.export import layout, serve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="output_dir of a finished sft.py run")
    parser.add_argument("--gguf", help="its export.py folder or .gguf file (default: ADAPTER-gguf)")
    parser.add_argument("--engine", choices=["llama.cpp", "vllm"], default="llama.cpp",
                        help="llama.cpp: serve here; vllm: print vLLM's command lines for a CUDA GPU")  # fmt: skip
    parser.add_argument("--merged", help="with --engine vllm: merge.py's folder (default: ADAPTER-merged)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", help="the model name clients ask for (default: the adapter folder's)")
    parser.add_argument("--ctx", type=int, help="context length in tokens (default: the recipe's max_length)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads for llama.cpp")
    parser.add_argument("--api_key", default=os.environ.get("GEMMA_SFT_API_KEY"),
                        help="require this bearer token (default: $GEMMA_SFT_API_KEY; none)")  # fmt: skip
    args = parser.parse_args(argv)

    adapter_dir = Path(args.adapter)
    facts = serve.adapter_facts(adapter_dir)  # a missing or unfinished adapter fails here, before anything loads
    name = args.name or facts["name"]
    context = args.ctx or facts["max_length"] or serve.DEFAULT_CONTEXT
    warning = serve.host_warning(args.host, args.port, args.api_key)

    if args.engine == "vllm":
        merged = Path(args.merged or f"{adapter_dir}-merged")
        if merged.is_dir():
            problems = layout.check_merged(merged)
            if problems:
                raise UserError(f"{merged} would not load in vLLM or transformers: {'; '.join(problems)}")
            print(f"{merged}: config and weight names are what vLLM's and transformers' Gemma 3 loaders expect")
        else:
            print(f"{merged} does not exist yet: `python merge.py --adapter {adapter_dir} --output {merged}`")
        if warning:
            print(warning)
        print("On a CUDA GPU with vLLM installed (pip install vllm), either the base model with the adapter apart:")
        base_line, merged_line = serve.vllm_commands(adapter_dir, merged, name, context, facts["rank"] or 16,
                                                     args.host, args.port)  # fmt: skip
        print(f"  {base_line}\nor the merged model:\n  {merged_line}")
        return 0

    gguf_arg = args.gguf or f"{adapter_dir}-gguf"
    if not Path(gguf_arg).exists():
        raise UserError(
            f"no GGUF export at {gguf_arg}: `python export.py --adapter {adapter_dir} --output {gguf_arg}` first "
            "(`make serve` does it), or pass --gguf"
        )
    if missing := serve.server_missing():
        raise UserError(missing)
    gguf = serve.find_gguf(gguf_arg)
    stored = serve.gguf_facts(gguf)
    if stored["chat_template"] != facts["chat_template"]:
        raise UserError(f"{gguf} holds another chat template than {adapter_dir}: export the adapter again")
    if stored["context_length"]:
        context = min(context, stored["context_length"])
    serve.check_port_free(args.host, args.port)
    if warning:
        print(warning)

    import uvicorn

    print(f"loading {gguf} ...", flush=True)
    app = serve.build_app(gguf, name, context, args.threads, facts["chat_template"], args.api_key)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"serving '{name}' (llama.cpp, {context}-token context, {args.threads} threads) at "
          f"http://{shown}:{args.port}/v1 - OpenAI API, one request at a time (Ctrl-C stops)", flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


# How the entry script reports an interruption or running out of memory (gemma_sft.errors.run)
RUN_OPTIONS = dict(on_interrupt="stopped")
