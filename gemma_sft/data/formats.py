"""Formats: each row becomes a list of {"role", "content"} chat messages, a skip reason, or a one-line error."""

import json

from gemma_sft.data.sources import Record
from gemma_sft.errors import UserError

FORMATS = {
    "belle": "Belle rows {instruction, input, output}",
    "text": 'single "text" field "### 指令:\\n...\\n\\n### 回答:\\n..."',
    "messages": "conversations {messages: [{role, content}, ...]}",
    "prompt_completion": "{prompt, completion}",
}
INSTRUCTION_MARK = "### 指令:"
ANSWER_MARK = "### 回答:"


class Skip(Exception):
    """A row left out for a reason the user accepts; counted by reason in the summary."""


def detect_format(record: Record) -> str:
    row = record.value
    if not isinstance(row, dict):
        raise UserError(f"{record.where}: expected a JSON object per row, got {type(row).__name__}")
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "belle"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    # JSON-quoted: a key may hold a newline or other control characters, and the error stays on one line
    shown = ", ".join(json.dumps(key, ensure_ascii=False) for key in sorted(keys)[:8]) or "none"
    expected = "; ".join(FORMATS.values())
    raise UserError(f"{record.where}: unknown data format (keys: {shown}); expected one of: {expected}")


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise UserError(f"{where}: missing required field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _turns(prompt: str, answer: str) -> list[dict]:
    if not prompt.strip():
        raise Skip("empty prompt")
    if not answer.strip():
        raise Skip("empty answer")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _from_belle(row: dict, where: str) -> list[dict]:
    instruction = _text(row, "instruction", where)
    extra = _text(row, "input", where, required=False)
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    return _turns(prompt, _text(row, "output", where))


def _from_text(row: dict, where: str) -> list[dict]:
    text = _text(row, "text", where)
    if ANSWER_MARK not in text:
        raise UserError(f"{where}: field 'text' has no '{ANSWER_MARK}' marker separating prompt and answer")
    prompt, answer = text.split(ANSWER_MARK, 1)
    prompt = prompt.strip()
    if prompt.startswith(INSTRUCTION_MARK):
        prompt = prompt[len(INSTRUCTION_MARK) :]
    return _turns(prompt.strip(), answer.strip())


def _check_messages(messages: object, where: str, key: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field '{key}' must be a non-empty list of {{role, content}} objects")
    checked = []
    for index, message in enumerate(messages):
        at = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise UserError(f"{where}: {at} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise UserError(f"{where}: {at}.role must be 'system', 'user' or 'assistant', got {role!r}")
        if not isinstance(content, str):
            raise UserError(f"{where}: {at}.content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    turns = checked[1:] if checked[0]["role"] == "system" else checked
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(checked) - len(turns)
            raise UserError(
                f"{where}: {key}[{index + offset}].role is '{message['role']}' but '{expected}' was expected "
                "(an optional system message, then user and assistant turns alternating)"
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise UserError(f"{where}: field '{key}' must end with an assistant turn (the answer to learn)")
    if any(not m["content"].strip() for m in turns if m["role"] == "assistant"):
        raise Skip("empty answer")
    if any(not m["content"].strip() for m in turns if m["role"] == "user"):
        raise Skip("empty prompt")
    return checked


def _from_messages(row: dict, where: str) -> list[dict]:
    return _check_messages(row["messages"], where)


def _from_prompt_completion(row: dict, where: str) -> list[dict]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt-completion form
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise UserError(f"{where}: 'prompt' and 'completion' must both be strings or both be message lists")
        return _check_messages(prompt + completion, where, key="prompt+completion")
    return _turns(_text(row, "prompt", where), _text(row, "completion", where))


CONVERTERS = {
    "belle": _from_belle,
    "text": _from_text,
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
}


def to_messages(record: Record, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """One row in `fmt` as chat messages; raises UserError for a malformed row and Skip for an unusable one."""
    if not isinstance(record.value, dict):
        raise UserError(f"{record.where}: expected a JSON object per row, got {type(record.value).__name__}")
    messages = CONVERTERS[fmt](record.value, record.where)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def category_of(record: Record) -> str | None:
    """A row's optional "category" (Belle's task type: open_qa, maths, ...), which reports break results down by."""
    value = record.value.get("category") if isinstance(record.value, dict) else None
    if value is not None and not isinstance(value, str):
        raise UserError(f"{record.where}: field 'category' must be a string, got {type(value).__name__}")
    return value or None
