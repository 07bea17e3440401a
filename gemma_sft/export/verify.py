"""An exported GGUF file read back in llama.cpp and held against the merged model it came from, before publishing.

Three fixed chats (Chinese, English, one with a system message) go through the path a llama.cpp server takes: the
chat template stored in the file, llama.cpp's own tokenizer, its end-of-generation tokens. The prompt must be the
merged model's prompt token for token, with one <bos>; along transformers' greedy answer (the first GREEDY_TOKENS
tokens) llama.cpp must pick the same token at every step, unless the two candidates are closer in transformers than
llama.cpp's rounding error there (a near tie), and its logits must stay within LOGIT_TOLERANCE; generation must end
at <end_of_turn> without printing it.
"""

import contextlib
import os

from gemma_sft import UserError

GREEDY_TOKENS = 20
CHATS = [
    [{"role": "user", "content": "1加1等于几？只回答数字。"}],
    [{"role": "user", "content": "Say hello in one word."}],
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "中国的首都是哪里？请用一句话回答。"},
    ],
]
# How far llama.cpp's logits may stray from transformers' (float32), as a share of the largest logit. Measured on
# the embedded 270M with a random adapter: at most 0.9% for f16 (llama.cpp rounds activations to f16 in its matrix
# products) and 11% for q8_0; a file with a wrong mapping (a norm stored without its + 1) is off by over 100%.
LOGIT_TOLERANCE = {"f16": 0.03, "q8_0": 0.25}


def llama_cpp_missing() -> str | None:
    """Why the check cannot run here (llama-cpp-python not installed), or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return (
            "llama.cpp is not installed here (llama-cpp-python), so the exported file cannot be checked in it: "
            "`pip install -r requirements-llama-cpp.txt` builds it (about 9 minutes on 2 cores; `make serve` and "
            "`make test` do), or pass --no-verify to export without the check"
        )
    return None


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp prints notes from C (e.g. about its sliding-window cache) even when asked to be quiet."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _prompt(llm, chat) -> list[int]:
    """The prompt tokens as llama-cpp-python's server builds them from the template stored in the file."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    special = {
        name: llm.detokenize([token], special=True).decode("utf-8")
        for name, token in (("bos_token", llm.token_bos()), ("eos_token", llm.token_eos()))
    }
    formatted = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], **special)(messages=chat)
    return llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)


def _reference_prompt(tokenizer, chat) -> list[int]:
    """The prompt as training and transformers see it: the template writes the one <bos> itself."""
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_gguf(path: str | os.PathLike, model, tokenizer, kind: str) -> str:
    """Raise a one-line UserError where the file at `path` does not run like `model` (the merged model, any dtype;
    compared in float32); return a short summary of what was checked."""
    import llama_cpp
    import numpy as np
    import torch

    from gemma_sft.models import END_OF_TURN, stop_token_ids

    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model = model.float().eval()
    prompts = [_reference_prompt(tokenizer, chat) for chat in CHATS]
    longest = max(len(ids) for ids in prompts)
    with quiet_stderr():
        # logits_all: one row of logits per position, to compare every step of the answer in one pass
        llm = llama_cpp.Llama(os.fspath(path), n_ctx=longest + GREEDY_TOKENS + 8, logits_all=True, verbose=False,
                              n_threads=max(1, len(os.sched_getaffinity(0))), seed=0)  # fmt: skip
    # The 4B's embedding has padding rows past the tokenizer's ids, cut from the file: never a token to pick
    vocab = llm.n_vocab()
    padding = list(range(vocab, model.get_output_embeddings().weight.shape[0]))
    try:
        if llm.metadata.get("tokenizer.chat_template") != tokenizer.chat_template:
            raise UserError("the chat template stored in the GGUF file is not the adapter's")
        worst = 0.0
        for number, (chat, expected) in enumerate(zip(CHATS, prompts), 1):
            what = f"chat {number} ({chat[-1]['content']!r})"
            ids = _prompt(llm, chat)
            if ids.count(tokenizer.bos_token_id) != 1:
                raise UserError(f"{what}: llama.cpp's prompt holds {ids.count(tokenizer.bos_token_id)} <bos> tokens")
            if ids != expected:
                raise UserError(f"{what}: llama.cpp tokenizes the prompt differently from the adapter's tokenizer")
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                     eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                     suppress_tokens=padding or None, output_logits=True,
                                     return_dict_in_generate=True)  # fmt: skip
            answer = out.sequences[0, len(ids) :].tolist()
            reference = torch.cat(out.logits).float().numpy()[:, :vocab]  # one row per answer token, unprocessed
            # Teacher-forced on transformers' answer: llama.cpp's logits for every step of the same text
            llm.reset()
            llm.eval(ids + answer[:-1])
            ours = np.array(llm.scores[len(ids) - 1 : len(ids) + len(answer) - 1])
            for step, (token, got, want) in enumerate(zip(answer, ours, reference)):
                error = float(np.abs(got - want).max())
                share = error / float(np.abs(want).max())
                worst = max(worst, share)
                picked = int(got.argmax())
                # Two tokens can swap places only when their gap in transformers is within twice llama.cpp's error
                near_tie = want[token] - want[picked] <= 2 * error
                if share > LOGIT_TOLERANCE[kind] or (picked != token and not near_tie):
                    raise UserError(
                        f"{what}, answer token {step + 1}: llama.cpp picks {tokenizer.decode([picked])!r} where the "
                        f"merged model picks {tokenizer.decode([token])!r} (logits differ by {share:.0%} of their "
                        "scale): the file does not run like the model"
                    )
            # The stop: with <end_of_turn> forced first, llama.cpp must end the answer there and print nothing (no
            # reset: the prompt is still in llama.cpp's cache)
            stop = llm.create_completion(ids, max_tokens=4, temperature=0.0, logit_bias={end_of_turn: 100.0})
            choice = stop["choices"][0]
            if choice["finish_reason"] != "stop" or choice["text"]:
                raise UserError(f"{what}: llama.cpp does not stop at {END_OF_TURN} (it wrote {choice['text']!r})")
    finally:
        llm.close()
    return (
        f"checked in llama.cpp: {len(CHATS)} chats give the merged model's prompt (one <bos>) and greedy answer "
        f"({GREEDY_TOKENS} tokens; logits within {worst:.1%}) and stop at {END_OF_TURN}"
    )
