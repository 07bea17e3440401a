"""Arrow tables: a source's rows checked and converted once, then tokenized with the answer mask, both cached."""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gemma_sft.data import answer_mask
from gemma_sft.data import cache as data_cache
from gemma_sft.data.formats import Skip, category_of, detect_format, to_messages
from gemma_sft.data.sources import Record, check_local_file, is_local, lines_of, load_hub, read_local, read_table, scan
from gemma_sft.errors import UserError

TOKENIZE_BATCH = 256  # conversations rendered and tokenized per call: the fast tokenizer encodes a batch at once
PARALLEL_ROWS = 20_000  # below this, worker processes cost more to start than they save

_ROW = "\x00row {}\x00"  # stands for a row's location in messages made inside `map`; replaced once it is known


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
        for number, line in enumerate(lines_of(file), start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return f"{path}:{number}"
    return f"{path} row {index}"


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
        path = check_local_file(source)
        content, objects = scan(path)
        identity = ["file", content, path.suffix]

        def build(scratch: Path):
            table = read_table(path, scratch) if objects else None
            if table is not None:
                try:
                    return _convert_table(table, source, system_prompt, num_proc, scratch)
                except UserError:
                    raise
                except Exception:  # a shape Arrow reads but `datasets` cannot give back (a key "\x00"...)
                    pass
            return _convert_records(read_local(source), source, system_prompt)
    else:
        hub = load_hub(source, config, split)
        identity = ["hub", source, config, split, hub._fingerprint]

        def build(scratch: Path):
            return _convert_table(hub, source, system_prompt, num_proc, scratch)

    key = data_cache.digest(*identity, system_prompt, data_cache.code_digest())
    table, meta = data_cache.cached("conversations", key, build, enabled=cache)
    return Conversations(source, meta["format"], meta["rows_read"], table, key)


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
    ids, masks = answer_mask.ids_and_masks(tokenizer, batch["messages"], fast_mask)
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
