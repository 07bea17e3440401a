"""Instruction data: read a Hub dataset or a local JSON/JSONL file, detect its format, turn each row into Gemma chat
messages, sample train/eval rows, and tokenize them with the answer mask TRL trains on.

Every problem with a row is either a `UserError` naming the file, line (or row) and field, or a skip counted by
reason in the summary; nothing is dropped silently.
"""

import json
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gemma_sft import UserError, hub_error

LOCAL_SUFFIXES = (".json", ".jsonl")
FORMATS = {
    "belle": "Belle rows {instruction, input, output}",
    "text": 'single "text" field "### 指令:\\n...\\n\\n### 回答:\\n..."',
    "messages": "conversations {messages: [{role, content}, ...]}",
    "prompt_completion": "{prompt, completion}",
}
INSTRUCTION_MARK = "### 指令:"
ANSWER_MARK = "### 回答:"


@dataclass
class Record:
    where: str  # "file.jsonl:12" or "BelleGroup/train_0.5M_CN row 12": what an error message points at
    value: object


@dataclass
class PreparedData:
    source: str
    format: str
    rows_read: int
    train: list[dict]
    eval: list[dict]
    train_messages: list[list[dict]]
    eval_messages: list[list[dict]]
    skipped: Counter = field(default_factory=Counter)
    eval_categories: list[str | None] = field(default_factory=list)  # each row's "category" field, if any
    train_categories: list[str | None] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def is_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists() or source.startswith((".", "/", "~"))


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None


def _json_error(path: Path, exc: json.JSONDecodeError, first_line: int = 1) -> UserError:
    return UserError(f"{path}:{first_line + exc.lineno - 1}: invalid JSON: {exc.msg} (column {exc.colno})")


def _read_json_array(path: Path, text: str) -> list[Record]:
    """Parse a top-level JSON array element by element, so each record knows its line number."""
    decoder = json.JSONDecoder()
    records = []
    at = text.index("[") + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if at < len(text) and text[at] == "]" and not records:
            break
        line = text.count("\n", 0, at) + 1
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc) from None
        records.append(Record(f"{path}:{line}", value))
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if at < len(text) and text[at] == ",":
            at += 1
        elif at < len(text) and text[at] == "]":
            break
        else:
            line = text.count("\n", 0, at) + 1
            raise UserError(f"{path}:{line}: invalid JSON: expected ',' or ']' after an array element")
    rest = text[at + 1 :]
    if rest.strip():
        line = text.count("\n", 0, at + 1 + len(rest) - len(rest.lstrip())) + 1
        raise UserError(f"{path}:{line}: invalid JSON: unexpected data after the closing ']'")
    return records


def _read_json_lines(path: Path, text: str) -> list[Record]:
    records = []
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and other characters that JSON strings may
    # hold unescaped
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc, first_line=number) from None
        records.append(Record(f"{path}:{number}", value))
    return records


def read_local(source: str) -> list[Record]:
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"{path}: unsupported file type '{path.suffix}' (use .json or .jsonl)")
    text = _decode(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return _read_json_array(path, text)
    if path.suffix == ".json" and text.strip():
        try:  # a single JSON object holding one row is unusual but valid JSON; one object per line is handled below
            value = json.loads(text)
            return [Record(f"{path}:1", value)]
        except json.JSONDecodeError:
            pass
    return _read_json_lines(path, text)


def read_hub(name: str, config: str | None, split: str) -> list[Record]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, name=config, split=split)
    except Exception as exc:  # offline, missing, gated, bad config...: all mean "could not fetch"; say so in one line
        raise hub_error(
            "dataset", name, exc, "dataset_name (or --data_path) to the local .json/.jsonl file",
            f"hf download --repo-type dataset {name}",
        ) from None  # fmt: skip
    return [Record(f"{name} row {index}", row) for index, row in enumerate(dataset)]


# ---------------------------------------------------------------------------------------------------------------
# Formats: each row becomes a list of {"role", "content"} messages, or a skip reason
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing, sampling and the summary
# ---------------------------------------------------------------------------------------------------------------
def tokenize(tokenizer, messages: list[dict]) -> dict:
    """Token ids and the answer mask (1 on each answer and its <end_of_turn>), from the chat template's markers."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return {"input_ids": list(encoded["input_ids"]), "assistant_masks": list(encoded["assistant_masks"])}


TOKENIZE_BATCH = 256  # conversations rendered and tokenized per call: the fast tokenizer encodes a batch at once


def tokenize_many(tokenizer, conversations: list[list[dict]]) -> list[dict]:
    """`tokenize` for several conversations in one call (the same ids and masks, a few times faster)."""
    if not conversations:
        return []
    encoded = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return [
        {"input_ids": list(ids), "assistant_masks": list(mask)}
        for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"])
    ]


def load_records(source: str, config: str | None = None, split: str = "train") -> list[Record]:
    if not source:
        raise UserError("no data: set dataset_name in the recipe or pass --data_path FILE")
    return read_local(source) if is_local(source) else read_hub(source, config, split)


def prepare(
    records: list[Record],
    source: str,
    tokenizer,
    *,
    max_samples: int,
    eval_samples: int,
    max_length: int | None,
    seed: int,
    system_prompt: str | None = None,
    drop_overlong: bool = True,
) -> PreparedData:
    """Validate every row, then draw eval and train rows at random (fixed seed) and tokenize them."""
    if not records:
        raise UserError(f"{source}: no rows found")
    if max_samples < 0 or eval_samples < 0:
        raise UserError("max_samples and eval_samples must be 0 or more")
    fmt = detect_format(records[0])
    skipped: Counter = Counter()
    usable, categories = [], []
    for record in records:
        try:
            usable.append(to_messages(record, fmt, system_prompt))
        except Skip as reason:
            skipped[str(reason)] += 1
            continue
        categories.append(category_of(record))

    order = list(range(len(usable)))
    random.Random(seed).shuffle(order)
    wanted = eval_samples + max_samples if max_samples else None
    kept_ids, kept_messages, kept_categories = [], [], []
    # Rows are taken in the shuffled order until enough are kept; they are tokenized a batch ahead, so a few past the
    # last one kept may be tokenized for nothing, but the rows chosen are the same as one at a time.
    for start in range(0, len(order), TOKENIZE_BATCH):
        if wanted is not None and len(kept_ids) == wanted:
            break
        batch = order[start : start + TOKENIZE_BATCH]
        for index, tokens in zip(batch, tokenize_many(tokenizer, [usable[i] for i in batch])):
            if wanted is not None and len(kept_ids) == wanted:
                break
            if max_length is not None and len(tokens["input_ids"]) > max_length and drop_overlong:
                skipped[f"longer than max_length={max_length}"] += 1
                continue
            kept_ids.append(tokens)
            kept_messages.append(usable[index])
            kept_categories.append(categories[index])

    if len(kept_ids) <= eval_samples:
        detail = ", ".join(f"{count} {reason}" for reason, count in skipped.items()) or "none skipped"
        raise UserError(
            f"{source}: only {len(kept_ids)} usable rows of {len(records)} ({detail}); "
            f"need more than eval_samples={eval_samples}"
        )
    return PreparedData(
        source=source,
        format=fmt,
        rows_read=len(records),
        eval=kept_ids[:eval_samples],
        train=kept_ids[eval_samples:],
        eval_messages=kept_messages[:eval_samples],
        train_messages=kept_messages[eval_samples:],
        skipped=skipped,
        eval_categories=kept_categories[:eval_samples],
        train_categories=kept_categories[eval_samples:],
    )


def category_of(record: Record) -> str | None:
    """A row's optional "category" (Belle's task type: open_qa, maths, ...), which reports break results down by."""
    value = record.value.get("category") if isinstance(record.value, dict) else None
    if value is not None and not isinstance(value, str):
        raise UserError(f"{record.where}: field 'category' must be a string, got {type(value).__name__}")
    return value or None


def prepare_from_settings(settings: dict, tokenizer) -> PreparedData:
    """Load and prepare the data a resolved recipe describes (see config.SAMPLING_KEYS).

    With `eval_dataset_name`, the held-out rows are `eval_samples` rows drawn from that file (all of it for 0) and
    every usable row of the training data may be trained on; otherwise they are split off the training data.
    """
    source = settings["dataset_name"]
    records = load_records(source, settings["dataset_config"], settings["dataset_train_split"])
    separate_eval = settings.get("eval_dataset_name")
    prepared = prepare(
        records,
        source,
        tokenizer,
        max_samples=settings["max_samples"],
        eval_samples=0 if separate_eval else settings["eval_samples"],
        max_length=settings["max_length"],
        seed=settings["seed"],
        system_prompt=settings["system_prompt"],
        drop_overlong=settings["drop_overlong"],
    )
    if separate_eval:
        held_out = prepare(
            load_records(separate_eval),
            separate_eval,
            tokenizer,
            max_samples=settings["eval_samples"],
            eval_samples=0,
            max_length=settings["max_length"],
            seed=settings["seed"],
            system_prompt=settings["system_prompt"],
            drop_overlong=settings["drop_overlong"],
        )
        prepared.eval, prepared.eval_messages = held_out.train, held_out.train_messages
        prepared.eval_categories = held_out.train_categories
    return prepared


def summarize(data: PreparedData, tokenizer) -> tuple[str, dict]:
    """A human summary of the prepared data and the JSON-able figures behind it."""
    lengths = sorted(len(row["input_ids"]) for row in data.train)
    answer_tokens = sum(sum(row["assistant_masks"]) for row in data.train)
    stats = {
        "source": data.source,
        "format": data.format,
        "rows_read": data.rows_read,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "skipped": dict(data.skipped),
        "train_tokens": sum(lengths),
        "train_answer_tokens": answer_tokens,
        "tokens_per_row": {
            "min": lengths[0],
            "mean": round(statistics.fmean(lengths), 1),
            "p50": lengths[len(lengths) // 2],
            "p95": lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))],
            "max": lengths[-1],
        },
    }
    skipped = ", ".join(f"{count} {reason}" for reason, count in data.skipped.items()) or "none"
    t = stats["tokens_per_row"]
    first = data.train[0]
    example = tokenizer.decode(first["input_ids"])
    trained = tokenizer.decode([t for t, m in zip(first["input_ids"], first["assistant_masks"]) if m])
    text = "\n".join(
        [
            f"Data: {data.source} ({FORMATS[data.format]})",
            f"  rows read {data.rows_read}; kept {len(data.train)} train + {len(data.eval)} eval; skipped: {skipped}",
            f"  train tokens {stats['train_tokens']:,} ({answer_tokens:,} supervised); per row min {t['min']}, "
            f"mean {t['mean']}, p50 {t['p50']}, p95 {t['p95']}, max {t['max']}",
            "  first training example as the model sees it:",
            *("    | " + line for line in example.splitlines()),
            "  of which the loss covers (answer and <end_of_turn>):",
            *("    > " + line for line in trained.splitlines()),
        ]
    )
    return text, stats
