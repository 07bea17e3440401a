"""Reading rows: local JSON/JSONL files (strictly, each row knowing its file and line) and Hub datasets."""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from gemma_sft.errors import UserError, hub_error

LOCAL_SUFFIXES = (".json", ".jsonl")


@dataclass
class Record:
    where: str  # "file.jsonl:12" or "BelleGroup/train_0.5M_CN row 12": what an error message points at
    value: object


def is_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists() or source.startswith((".", "/", "~"))


def check_local_file(source: str, suffixes: tuple[str, ...] = LOCAL_SUFFIXES) -> Path:
    """The path of a local data file, or a one-line error saying why it cannot be read."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a data file (give the .json or .jsonl file inside it)")
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    if path.suffix not in suffixes:
        wanted = " or ".join(suffixes)
        raise UserError(f"{path}: unsupported file type '{path.suffix}' (use {wanted})")
    return path


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
    path = check_local_file(source)
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


def load_hub(name: str, config: str | None, split: str, streaming: bool = False):
    try:
        from datasets import load_dataset

        return load_dataset(name, name=config, split=split, streaming=streaming)
    except Exception as exc:  # offline, missing, gated, bad config...: all mean "could not fetch"; say so in one line
        raise hub_error(
            "dataset", name, exc, "dataset_name (or --data_path) to the local .json/.jsonl file",
            f"hf download --repo-type dataset {name}",
        ) from None  # fmt: skip


def lines_of(file):
    """A text file's lines split on "\\n" only (as the JSON-lines reader splits them)."""
    rest = ""
    while chunk := file.read(1 << 20):
        parts = (rest + chunk).split("\n")
        rest = parts.pop()
        yield from parts
    yield rest


_NOT_AN_OBJECT = re.compile(rb"(?m)^[ \t\r]*[^{ \t\r\n]")  # a line that starts with anything but "{"


def scan(path: Path) -> tuple[str, bool]:
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


def read_table(path: Path, scratch: Path):
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


def load_records(source: str, config: str | None = None, split: str = "train") -> list[Record]:
    """Every row of a local file or Hub dataset as a Record, read strictly row by row (no cache)."""
    if not source:
        raise UserError("no data: set dataset_name in the recipe or pass --data_path FILE")
    if is_local(source):
        return read_local(source)
    return [Record(f"{source} row {index}", row) for index, row in enumerate(load_hub(source, config, split))]


def stream_records(source: str, config: str | None, split: str):
    """A source's rows one at a time, for sets larger than the disk: JSON lines or a streamed Hub dataset."""
    if not is_local(source):
        for index, row in enumerate(load_hub(source, config, split, streaming=True)):
            yield Record(f"{source} row {index}", row)
        return
    path = check_local_file(source, (".jsonl",))
    number = 0
    with open(path, encoding="utf-8-sig", newline="") as file:
        try:
            for number, line in enumerate(lines_of(file), start=1):
                line = line.removesuffix("\r")
                if not line.strip():
                    continue
                try:
                    yield Record(f"{path}:{number}", json.loads(line))
                except json.JSONDecodeError as exc:
                    raise _json_error(path, exc, first_line=number) from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid UTF-8 (near line {number}); save the file as UTF-8") from None
