"""Chat with a fine-tuned adapter (or its base model) in the terminal, through the Gemma 3 chat template.

    python chat.py --adapter outputs/gemma3-270m-belle-demo
    python chat.py --adapter outputs/gemma3-270m-belle-demo --system "你是一个简洁的助手。"
    python chat.py --adapter outputs/gemma3-270m-belle-demo --prompt "写一首关于秋天的短诗"   # one shot, then exit
    python chat.py --adapter outputs/gemma3-270m-belle-demo --base                          # the base model

In the chat: /reset clears the conversation, /base and /adapter switch models, /exit (or Ctrl-D) quits.
"""

from gemma_sft.commands.chat import RUN_OPTIONS, main
from gemma_sft.errors import run

__all__ = ["main"]

if __name__ == "__main__":
    run(main, **RUN_OPTIONS)
