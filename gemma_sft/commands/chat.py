"""Chat with a fine-tuned adapter (or its base model) in the terminal, through the Gemma 3 chat template.

    python chat.py --adapter outputs/gemma3-270m-belle-demo
    python chat.py --adapter outputs/gemma3-270m-belle-demo --system "你是一个简洁的助手。"
    python chat.py --adapter outputs/gemma3-270m-belle-demo --prompt "写一首关于秋天的短诗"   # one shot, then exit
    python chat.py --adapter outputs/gemma3-270m-belle-demo --base                          # the base model

In the chat: /reset clears the conversation, /base and /adapter switch models, /exit (or Ctrl-D) quits.
"""

import argparse

COMMANDS = "/reset clears the conversation, /base and /adapter switch models, /exit quits"


def reply(model, tokenizer, messages, use_base: bool, max_new_tokens: int, temperature: float) -> str:
    """Generate the next model turn, printed as it streams, stopping at <end_of_turn>."""
    from gemma_sft.inference import stream_reply

    pieces = []
    for piece in stream_reply(model, tokenizer, messages, use_base, max_new_tokens, temperature):
        print(piece, end="", flush=True)
        pieces.append(piece)
    return "".join(pieces).strip()


def main(argv: list[str] | None = None) -> int:
    from gemma_sft import models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="output_dir of a finished sft.py run")
    parser.add_argument("--base", action="store_true", help="talk to the base model (adapter disabled)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    args = parser.parse_args(argv)

    model, tokenizer, _ = models.load_for_inference(args.adapter)
    system = [{"role": "system", "content": args.system}] if args.system else []
    use_base = args.base
    if args.prompt is not None:
        reply(model, tokenizer, [*system, {"role": "user", "content": args.prompt}], use_base, args.max_new_tokens,
              args.temperature)  # fmt: skip
        print()
        return 0

    print(f"Chatting with the {'base model' if use_base else 'adapter'}. {COMMANDS}.", flush=True)
    history: list[dict] = []
    while True:
        try:
            line = input("\n你> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line in ("/reset", "/base", "/adapter"):
            history = [] if line == "/reset" else history
            use_base = {"/base": True, "/adapter": False}.get(line, use_base)
            print(f"[{'conversation cleared' if line == '/reset' else 'now: ' + line[1:]}]")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("模型> ", end="", flush=True)
        answer = reply(model, tokenizer, [*system, *history], use_base, args.max_new_tokens, args.temperature)
        history.append({"role": "assistant", "content": answer})


RUN_OPTIONS: dict = {}
