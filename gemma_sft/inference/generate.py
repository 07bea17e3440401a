"""Generation, one way for every verb: greedy answers for the report, and streamed chat turns of the base model
(adapter disabled) or of the adapter for the terminal chat and the web page; all stop at <end_of_turn>."""

import contextlib
import threading
from collections.abc import Iterator

from gemma_sft.models.template import stop_token_ids

# The adapter switch (`disable_adapter`) is state of the whole model: two answers generated at once, one with it off
# and one with it on, would each see the other's setting. Every generation holds this lock from start to finish.
MODEL_LOCK = threading.Lock()


def build_messages(system: str | None, history: list[dict], prompt: str) -> list[dict]:
    """The conversation to answer: the system prompt (when given), the earlier turns, then the new user turn."""
    system_turn = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    return [*system_turn, *history, {"role": "user", "content": prompt}]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The exact text the model reads for `messages`, through the chat template saved with the adapter."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sampling_settings(temperature: float, top_p: float) -> dict:
    """Greedy at temperature 0 (reproducible, so base and adapter can be compared), otherwise nucleus sampling."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}


class _Cancelled:
    """A stopping criterion that ends generation early once the page stops listening (closed tab, Reset)."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(
    model,
    tokenizer,
    messages: list[dict],
    use_base: bool,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 0.95,
) -> Iterator[str]:
    """Yield the next model turn piece by piece as it is generated, stopping at <end_of_turn>.

    `use_base` answers with the adapter disabled: the same weights in memory, without the LoRA update. The pieces
    joined are the decoded answer (special tokens skipped).
    """
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    encoded = {key: value.to(device) for key, value in encoded.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled = _Cancelled()
    failure: list[BaseException] = []

    def work():
        adapter_off = model.disable_adapter() if use_base else contextlib.nullcontext()
        try:
            with adapter_off, torch.no_grad():
                model.generate(
                    **encoded,
                    max_new_tokens=int(max_new_tokens),
                    streamer=streamer,
                    eos_token_id=stop_token_ids(tokenizer),
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([cancelled]),
                    **sampling_settings(temperature, top_p),
                )
        except BaseException as error:  # reported by the reading side; the streamer must still end
            failure.append(error)
            streamer.end()

    with MODEL_LOCK:
        thread = threading.Thread(target=work, name="generate", daemon=True)
        thread.start()
        finished = False
        try:
            for piece in streamer:
                if piece:
                    yield piece
            finished = True
        finally:
            if not finished:  # the reader stopped early: stop generating before the next answer takes the model
                cancelled.event.set()
                for _ in streamer:  # up to the streamer's end, so that the thread is never blocked on it
                    pass
            thread.join()
    if failure:
        raise failure[0]


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 128) -> list[str]:
    """Greedy answers to chat prompts (messages up to the last user turn), batched, stopping at <end_of_turn>."""
    import torch

    model.eval()
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(
        next(model.parameters()).device
    )
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    answers = output[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in answers]
