"""Instruction data: read a Hub dataset or a local JSON/JSONL file, detect its format, turn each row into Gemma chat
messages, sample train/eval rows, and tokenize them with the answer mask TRL trains on.

Every problem with a row is either a `UserError` naming the file, line (or row) and field, or a skip counted by
reason in the summary; nothing is dropped silently.
"""

import json
import logging
import os
import random
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gemma_sft import UserError, answer_mask, data_cache, hub_error

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
    line, counted = 1, 0  # the line number at `counted`, advanced as the elements are read (not recounted)
    while True:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if at < len(text) and text[at] == "]" and not records:
            break
        line, counted = line + text.count("\n", counted, at), at
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


def _load_hub(name: str, config: str | None, split: str, streaming: bool = False):
    try:
        from datasets import load_dataset

        return load_dataset(name, name=config, split=split, streaming=streaming)
    except Exception as exc:  # offline, missing, gated, bad config...: all mean "could not fetch"; say so in one line
        raise hub_error(
            "dataset", name, exc, "dataset_name (or --data_path) to the local .json/.jsonl file",
            f"hf download --repo-type dataset {name}",
        ) from None  # fmt: skip


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
# Conversations, tokenizing, sampling and the summary
# ---------------------------------------------------------------------------------------------------------------
TOKENIZE_BATCH = 256  # conversations rendered and tokenized per call: the fast tokenizer encodes a batch at once
PARALLEL_ROWS = 20_000  # below this, worker processes cost more to start than they save
STREAM_BUFFER = 10_000  # rows a streamed source is shuffled within
_ROW = "\x00row {}\x00"  # stands for a row's location in messages made inside `map`; replaced once it is known


def tokenize_many(tokenizer, conversations: list[list[dict]], fast_mask: bool = True) -> list[dict]:
    """Token ids and the answer mask (1 on each answer and its <end_of_turn>, from the chat template's markers) for
    each conversation; one call for several is a few times faster than one each. fast_mask: the same ids and mask
    found without character offsets (gemma_sft/answer_mask.py), else transformers' own."""
    if not conversations:
        return []
    ids, masks = answer_mask.tokenize(tokenizer, conversations, fast_mask)
    return [{"input_ids": row_ids, "assistant_masks": mask} for row_ids, mask in zip(ids, masks)]


def tokenize(tokenizer, messages: list[dict]) -> dict:
    """`tokenize_many` for one conversation."""
    return tokenize_many(tokenizer, [messages])[0]


def num_proc_for(rows: int, asked: int | None) -> int | None:
    """Worker processes for `rows` rows: the recipe's dataset_num_proc, else one per core (up to 8) for big sets."""
    if asked is not None:
        return asked if asked > 1 else None
    return min(os.cpu_count() or 1, 8) if rows >= PARALLEL_ROWS and (os.cpu_count() or 1) > 1 else None


def _features(kind: str):
    from datasets import Features, List, Value

    if kind == "conversations":
        message = {"role": Value("string"), "content": Value("string")}
        return Features(
            {
                "messages": List(message),
                "category": Value("string"),
                "skip": Value("string"),
                "problem": Value("string"),
            }
        )
    return Features(
        {
            "input_ids": List(Value("int32")),
            "assistant_masks": List(Value("int8")),
            "length": Value("int32"),
            "answer_tokens": Value("int32"),
        }
    )


@dataclass
class Conversations:
    """Every row of one source as chat messages or the reason it is skipped, in a memory-mapped Arrow table with
    the columns messages, category and skip, in the source's order."""

    source: str
    format: str
    rows_read: int
    table: object  # datasets.Dataset
    key: str  # the cache key of this table; the tokenized rows' keys build on it


def _converted(record: Record, fmt: str, system_prompt: str | None) -> tuple[list[dict], str | None, str | None]:
    """(messages, category, skip reason) of one row; a malformed row raises UserError."""
    try:
        return to_messages(record, fmt, system_prompt), category_of(record), None
    except Skip as reason:
        return [], None, str(reason)


def _convert_batch(batch: dict, indices: list[int], fmt: str, system_prompt: str | None) -> dict:
    out = {"messages": [], "category": [], "skip": [], "problem": []}
    for j, index in enumerate(indices):
        # an Arrow table has every column in every row, None where a row lacks it: as a missing key to the converters
        record = Record(_ROW.format(index), {key: values[j] for key, values in batch.items()})
        try:
            row = (*_converted(record, fmt, system_prompt), None)
        except UserError as error:
            row = ([], None, None, str(error))
        for key, value in zip(out, row):
            out[key].append(value)
    return out


def _locate(source: str, index: int) -> str:
    """Where the index-th row of `source` is: "file:line" for a local JSON-lines file (the only local kind read as
    an Arrow table, see `_scan`), "name row N" for a Hub dataset."""
    if not is_local(source):
        return f"{source} row {index}"
    path = Path(source).expanduser()
    seen = -1
    with open(path, encoding="utf-8-sig", newline="") as file:
        for number, line in enumerate(_lines(file), start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return f"{path}:{number}"
    return f"{path} row {index}"


def _lines(file):
    """A text file's lines split on "\\n" only (as the JSON-lines reader splits them)."""
    rest = ""
    while chunk := file.read(1 << 20):
        parts = (rest + chunk).split("\n")
        rest = parts.pop()
        yield from parts
    yield rest


def _first_row(table) -> dict:
    return {key: value for key, value in table[0].items() if value is not None}


def _convert_table(table, source: str, system_prompt: str | None, num_proc: int | None, scratch: Path):
    if len(table) == 0:
        raise UserError(f"{source}: no rows found")
    fmt = detect_format(Record(_locate(source, 0), _first_row(table)))
    converted = table.map(
        _convert_batch,
        batched=True,
        batch_size=1000,
        with_indices=True,
        fn_kwargs={"fmt": fmt, "system_prompt": system_prompt},
        remove_columns=table.column_names,
        features=_features("conversations"),
        num_proc=num_proc_for(len(table), num_proc),
        cache_file_name=str(scratch / "conversations.arrow"),
        new_fingerprint=data_cache.digest(table._fingerprint, fmt, system_prompt),  # not a hash of the arguments
        desc="Checking rows",
    )
    problems = converted.data.column("problem")
    if problems.null_count < len(problems):
        import pyarrow.compute as pc

        first = pc.index(pc.is_valid(problems), True).as_py()  # the first bad row in the source's order
        raise UserError(problems[first].as_py().replace(_ROW.format(first), _locate(source, first), 1))
    return converted.remove_columns("problem"), {"format": fmt, "rows_read": len(table)}


def _convert_records(records: list[Record], source: str, system_prompt: str | None):
    """The same conversion row by row, for files that Arrow cannot read as a table (a byte-order mark, a value that
    is not an object...): the reader and converters then name the exact line and field."""
    from datasets import Dataset

    if not records:
        raise UserError(f"{source}: no rows found")
    fmt = detect_format(records[0])
    columns = {"messages": [], "category": [], "skip": [], "problem": []}
    for record in records:
        for key, value in zip(columns, (*_converted(record, fmt, system_prompt), None)):
            columns[key].append(value)
    table = Dataset.from_dict(columns, features=_features("conversations")).remove_columns("problem")
    return table, {"format": fmt, "rows_read": len(records)}


_NOT_AN_OBJECT = re.compile(rb"(?m)^[ \t\r]*[^{ \t\r\n]")  # a line that starts with anything but "{"


def _scan(path: Path) -> tuple[str, bool]:
    """One pass over the file: its digest (its cache identity), whether it is UTF-8 (Arrow's reader does not check),
    and whether every line holds an object, the only shape Arrow's JSON-lines reader is given: it crashes the process
    on a file holding only `null` and reads a `null` line as a row of empty fields."""
    import codecs
    import hashlib

    h, decoder, offset, lines = hashlib.blake2b(digest_size=16), codecs.getincrementaldecoder("utf-8")(), 0, 1
    objects, tail = path.suffix == ".jsonl", b""
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            h.update(chunk)
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line = lines + chunk[: max(exc.start, 0)].count(b"\n")
                raise UserError(
                    f"{path}:{line}: not valid UTF-8 (byte {offset + exc.start}); save the file as UTF-8"
                ) from None
            if objects:
                text = tail + chunk
                cut = text.rfind(b"\n") + 1
                # fast case first: every newline is followed by "{" (or ends the text)
                simple = text.count(b"\n") - text.count(b"\n{") == (1 if cut == len(text) else 0) and text[:1] == b"{"
                objects = simple or not _NOT_AN_OBJECT.search(text, 0, cut)
                tail = text[cut:]
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(
            f"{path}:{lines}: not valid UTF-8 (the file ends mid-character); save the file as UTF-8"
        ) from None
    objects = objects and offset > 0 and not _NOT_AN_OBJECT.search(tail)
    return h.hexdigest(), objects


def _read_local_table(path: Path, scratch: Path):
    """The file as an Arrow table, or None where Arrow's JSON reader refuses it."""
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    quiet = logging.getLogger("datasets")
    level, quiet.level = quiet.level, logging.CRITICAL  # a refusal is logged as an error; ours is the one to show
    try:
        return load_dataset("json", data_files=str(path), split="train", cache_dir=str(scratch / "json"))
    except Exception:  # any refusal: the strict reader below says what is wrong, or reads it row by row
        return None
    finally:
        quiet.setLevel(level)


def load_conversations(
    source: str,
    config: str | None = None,
    split: str = "train",
    *,
    system_prompt: str | None = None,
    num_proc: int | None = None,
    cache: bool = True,
) -> Conversations:
    """Read, check and convert every row of a local JSON/JSONL file or Hub dataset (cached on disk, see data_cache).

    A malformed row is a UserError naming its file and line (or row) and field, the first one in the source's
    order, raised before anything is tokenized."""
    if not source:
        raise UserError("no data: set dataset_name in the recipe or pass --data_path FILE")
    if is_local(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: data file not found")
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{path}: unsupported file type '{path.suffix}' (use .json or .jsonl)")
        content, objects = _scan(path)
        identity = ["file", content, path.suffix]

        def build(scratch: Path):
            table = _read_local_table(path, scratch) if objects else None
            if table is not None:
                try:
                    return _convert_table(table, source, system_prompt, num_proc, scratch)
                except UserError:
                    raise
                except Exception:  # a shape Arrow reads but `datasets` cannot give back (a key "\x00"...)
                    pass
            return _convert_records(read_local(source), source, system_prompt)
    else:
        hub = _load_hub(source, config, split)
        identity = ["hub", source, config, split, hub._fingerprint]

        def build(scratch: Path):
            return _convert_table(hub, source, system_prompt, num_proc, scratch)

    key = data_cache.digest(*identity, system_prompt, data_cache.code_digest())
    table, meta = data_cache.cached("conversations", key, build, enabled=cache)
    return Conversations(source, meta["format"], meta["rows_read"], table, key)


def load_records(source: str, config: str | None = None, split: str = "train") -> list[Record]:
    """Every row of a local file or Hub dataset as a Record, read strictly row by row (no cache)."""
    if not source:
        raise UserError("no data: set dataset_name in the recipe or pass --data_path FILE")
    if is_local(source):
        return read_local(source)
    return [Record(f"{source} row {index}", row) for index, row in enumerate(_load_hub(source, config, split))]


class Column(Sequence):
    """One column of some rows of an Arrow table, read on demand (a list of 500k conversations would not fit)."""

    def __init__(self, table, column: str):
        self.table, self.column = table, column

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.table[index][self.column]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.table[index][self.column]

    def __iter__(self):
        for start in range(0, len(self), 1000):
            yield from self.table[start : start + 1000][self.column]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)


def _tokenize_batch(batch: dict, tokenizer, fast_mask: bool) -> dict:
    ids, masks = answer_mask.tokenize(tokenizer, batch["messages"], fast_mask)
    return {
        "input_ids": ids,
        "assistant_masks": masks,
        "length": list(map(len, ids)),
        "answer_tokens": list(map(sum, masks)),
    }


def tokenize_rows(
    conversations: Conversations, rows: list[int], tokenizer, *, num_proc=None, cache=True, fast_mask=True
):
    """The conversations at `rows` (indices into `conversations.table`) tokenized, in that order (cached).

    They are tokenized in the table's order, which reads it front to back, and the cache entry is the same for any
    order of the same rows (other seeds drawing every row reuse it)."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.int64)
    ascending = np.argsort(rows, kind="stable")
    in_table_order = rows[ascending]
    key = data_cache.digest(conversations.key, data_cache.tokenizer_digest(tokenizer), in_table_order.tobytes())

    def build(scratch: Path):
        contiguous = len(rows) == len(conversations.table) or not len(rows)
        chosen = conversations.table if contiguous else conversations.table.select(in_table_order)
        tokens = chosen.map(
            _tokenize_batch,
            batched=True,
            batch_size=TOKENIZE_BATCH,
            fn_kwargs={"tokenizer": tokenizer, "fast_mask": fast_mask},
            remove_columns=chosen.column_names,
            features=_features("tokens"),
            num_proc=num_proc_for(len(rows), num_proc),
            cache_file_name=str(scratch / "tokens.arrow"),
            new_fingerprint=key,  # ours: datasets' own would pickle the whole tokenizer to hash it
            desc="Tokenizing",
        )
        return tokens, {}

    tokens = data_cache.cached("tokens", key, build, enabled=cache)[0]
    position = np.empty_like(ascending)
    position[ascending] = np.arange(len(rows))  # where each asked-for row sits in table order
    return tokens if np.array_equal(position, np.arange(len(rows))) else tokens.select(position)


@dataclass
class PreparedData:
    source: str
    format: str
    rows_read: int
    train: object  # datasets.Dataset with input_ids and assistant_masks, what the Trainer gets
    eval: object
    train_messages: Sequence  # each row's chat messages, in the same order
    eval_messages: list[list[dict]]
    skipped: Counter = field(default_factory=Counter)
    eval_categories: list[str | None] = field(default_factory=list)  # each row's "category" field, if any
    train_categories: Sequence = field(default_factory=list)
    train_lengths: list[int] = field(default_factory=list)  # tokens per training row
    train_answer_tokens: int = 0  # supervised tokens in all training rows


def _skipped_as_overlong(length: int, max_length: int | None, drop_overlong: bool, skipped: Counter) -> bool:
    """Whether a tokenized row is dropped for its length (then counted in `skipped`)."""
    if max_length is not None and length > max_length and drop_overlong:
        skipped[f"longer than max_length={max_length}"] += 1
        return True
    return False


def _require_more_than_eval(source: str, kept: int, read: str, skipped: Counter, eval_samples: int) -> None:
    """The one-line error for a dataset with no training row left once the held-out rows are drawn."""
    if kept <= eval_samples:
        detail = ", ".join(f"{count} {reason}" for reason, count in skipped.items()) or "none skipped"
        raise UserError(
            f"{source}: only {kept} usable rows {read} ({detail}); need more than eval_samples={eval_samples}"
        )


def prepare(
    conversations: Conversations,
    tokenizer,
    *,
    max_samples: int,
    eval_samples: int,
    max_length: int | None,
    seed: int,
    drop_overlong: bool = True,
    num_proc: int | None = None,
    cache: bool = True,
    fast_mask: bool = True,
) -> PreparedData:
    """Draw eval and train rows at random (fixed seed) from the usable rows, tokenized; rows longer than max_length
    are skipped and counted (or kept, with drop_overlong false). Only as many rows as needed are tokenized."""
    import numpy as np
    from datasets import concatenate_datasets

    if max_samples < 0 or eval_samples < 0:
        raise UserError("max_samples and eval_samples must be 0 or more")
    source, table = conversations.source, conversations.table
    skips = table.data.column("skip")
    skipped: Counter = Counter(value for value in skips.to_pylist() if value is not None)
    usable = np.flatnonzero(np.asarray(skips.is_null()))
    order = list(range(len(usable)))
    random.Random(seed).shuffle(order)  # the same permutation as drawing from a list of the usable rows
    wanted = eval_samples + max_samples if max_samples else None

    # Rows are examined in the shuffled order until enough are kept. They are tokenized in chunks a little larger
    # than what is still needed (the overlong ones are dropped), so a few may be tokenized for nothing, but the rows
    # kept and the skips counted are those of examining one row at a time.
    parts, picks, lengths, answers, at, kept = [], [], [], [], 0, 0
    while at < len(order) and (wanted is None or kept < wanted):
        need = len(order) - at if wanted is None else wanted - kept
        size = min(len(order) - at, need + need // 16 + TOKENIZE_BATCH // 4)
        rows = usable[order[at : at + size]].tolist()
        at += size
        tokens = tokenize_rows(conversations, rows, tokenizer, num_proc=num_proc, cache=cache, fast_mask=fast_mask)
        counts = tokens.with_format("numpy", columns=["length", "answer_tokens"])[:]  # through the row order
        row_lengths, row_answers = counts["length"], counts["answer_tokens"]
        picked = []
        for j, length in enumerate(row_lengths.tolist()):
            if wanted is not None and kept + len(picked) == wanted:
                break
            if _skipped_as_overlong(length, max_length, drop_overlong, skipped):
                continue
            picked.append(j)
        parts.append((tokens, rows))
        picks.append(picked)
        lengths.append(row_lengths[picked])
        answers.append(row_answers[picked])
        kept += len(picked)

    _require_more_than_eval(source, kept, f"of {conversations.rows_read}", skipped, eval_samples)
    chosen = concatenate_datasets([tokens.select(picked) for (tokens, _), picked in zip(parts, picks)])
    chosen = chosen.select_columns(["input_ids", "assistant_masks"])
    source_rows = [rows[j] for (_, rows), picked in zip(parts, picks) for j in picked]
    originals = table.select(source_rows)
    held_out = originals.select(range(eval_samples))
    return PreparedData(
        source=source,
        format=conversations.format,
        rows_read=conversations.rows_read,
        eval=chosen.select(range(eval_samples)),
        train=chosen.select(range(eval_samples, kept)),
        eval_messages=held_out[:]["messages"],
        train_messages=Column(originals.select(range(eval_samples, kept)), "messages"),
        skipped=skipped,
        eval_categories=held_out[:]["category"],
        train_categories=Column(originals.select(range(eval_samples, kept)), "category"),
        train_lengths=np.concatenate(lengths)[eval_samples:].tolist(),
        train_answer_tokens=int(np.concatenate(answers)[eval_samples:].sum()),
    )


def _stream_records(source: str, config: str | None, split: str):
    """A source's rows one at a time, for sets larger than the disk: JSON lines or a streamed Hub dataset."""
    if not is_local(source):
        for index, row in enumerate(_load_hub(source, config, split, streaming=True)):
            yield Record(f"{source} row {index}", row)
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    if path.suffix != ".jsonl":
        raise UserError(f"{path}: dataset_streaming reads JSON lines (.jsonl) files; convert it or drop the flag")
    number = 0
    with open(path, encoding="utf-8-sig", newline="") as file:
        try:
            for number, line in enumerate(_lines(file), start=1):
                line = line.removesuffix("\r")
                if not line.strip():
                    continue
                try:
                    yield Record(f"{path}:{number}", json.loads(line))
                except json.JSONDecodeError as exc:
                    raise _json_error(path, exc, first_line=number) from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid UTF-8 (near line {number}); save the file as UTF-8") from None


def _shuffled(records, seed: int, buffer: int):
    """Rows in a seeded random order drawn through a buffer of `buffer` rows, as streamed datasets shuffle."""
    rng, pool = random.Random(seed), []
    for record in records:
        if len(pool) < buffer:
            pool.append(record)
            continue
        at = rng.randrange(buffer)
        yield pool[at]
        pool[at] = record
    rng.shuffle(pool)
    yield from pool


def prepare_streaming(
    source: str,
    tokenizer,
    *,
    config: str | None = None,
    split: str = "train",
    max_samples: int,
    eval_samples: int,
    max_length: int | None,
    seed: int,
    system_prompt: str | None = None,
    drop_overlong: bool = True,
    fast_mask: bool = True,
) -> PreparedData:
    """Rows read from the source only until eval_samples + max_samples usable ones are kept (nothing cached): for
    sets larger than the disk. The rows are shuffled within a buffer of STREAM_BUFFER rows, so they are not the
    rows the cached path draws for the same seed."""
    from datasets import Dataset

    if max_samples <= 0:
        raise UserError("dataset_streaming reads rows until it has max_samples of them: set max_samples above 0")
    wanted, read = eval_samples + max_samples, 0
    skipped: Counter = Counter()
    kept, messages, categories, fmt, pending = [], [], [], None, []

    def counted(records):
        nonlocal read
        for record in records:
            read += 1
            yield record

    def flush():
        conversations = [conversation for conversation, _ in pending]
        for (conversation, category), tokens in zip(pending, tokenize_many(tokenizer, conversations, fast_mask)):
            if len(kept) == wanted:
                break
            if _skipped_as_overlong(len(tokens["input_ids"]), max_length, drop_overlong, skipped):
                continue
            kept.append(tokens)
            messages.append(conversation)
            categories.append(category)
        pending.clear()

    for record in _shuffled(counted(_stream_records(source, config, split)), seed, STREAM_BUFFER):
        fmt = fmt or detect_format(record)
        try:
            pending.append((to_messages(record, fmt, system_prompt), category_of(record)))
        except Skip as reason:
            skipped[str(reason)] += 1
        if len(pending) == TOKENIZE_BATCH or len(kept) + len(pending) >= wanted:
            flush()
        if len(kept) == wanted:
            break
    flush()
    _require_more_than_eval(source, len(kept), f"in {read} read", skipped, eval_samples)
    train = kept[eval_samples:]
    return PreparedData(
        source=source,
        format=fmt,
        rows_read=read,
        eval=Dataset.from_list(kept[:eval_samples]),
        train=Dataset.from_list(train),
        eval_messages=messages[:eval_samples],
        train_messages=messages[eval_samples:],
        skipped=skipped,
        eval_categories=categories[:eval_samples],
        train_categories=categories[eval_samples:],
        train_lengths=[len(row["input_ids"]) for row in train],
        train_answer_tokens=sum(sum(row["assistant_masks"]) for row in train),
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
    source, separate_eval = settings["dataset_name"], settings.get("eval_dataset_name")
    common = {
        "max_length": settings["max_length"], "seed": settings["seed"], "drop_overlong": settings["drop_overlong"],
        "fast_mask": settings.get("fast_answer_mask", True),
    }  # fmt: skip
    cached = {"num_proc": settings.get("dataset_num_proc"), "cache": settings.get("data_cache", True)}
    train_eval = 0 if separate_eval else settings["eval_samples"]
    if settings.get("dataset_streaming"):
        prepared = prepare_streaming(
            source, tokenizer, config=settings["dataset_config"], split=settings["dataset_train_split"],
            max_samples=settings["max_samples"], eval_samples=train_eval, system_prompt=settings["system_prompt"],
            **common,
        )  # fmt: skip
    else:
        conversations = load_conversations(
            source, settings["dataset_config"], settings["dataset_train_split"],
            system_prompt=settings["system_prompt"], **cached,
        )  # fmt: skip
        prepared = prepare(
            conversations, tokenizer, max_samples=settings["max_samples"], eval_samples=train_eval, **common, **cached
        )
    if separate_eval:
        held_out = prepare(
            load_conversations(separate_eval, system_prompt=settings["system_prompt"], **cached),
            tokenizer, max_samples=settings["eval_samples"], eval_samples=0, **common, **cached,
        )  # fmt: skip
        prepared.eval, prepared.eval_messages = held_out.train, list(held_out.train_messages)
        prepared.eval_categories = list(held_out.train_categories)
    return prepared


def summarize(data: PreparedData, tokenizer) -> tuple[str, dict]:
    """A human summary of the prepared data and the JSON-able figures behind it."""
    lengths = sorted(data.train_lengths)
    answer_tokens = data.train_answer_tokens
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
