"""The on-disk cache of prepared data: converted and tokenized rows as memory-mapped Arrow tables.

An entry is found by a digest of everything its contents depend on: the data's bytes (a local file) or the Hub
dataset's fingerprint, the tokenizer's vocabulary and chat template, the settings that change the rows, and the code
that made them (this package's data modules). Change any of them and a new entry is built; nothing stale is reused.
Each entry ends with a manifest (every file's size and checksum, written last) that every read checks, so a damaged,
truncated or half-written entry is rebuilt, not trusted.
Entries live under GEMMA_SFT_DATA_CACHE, default `GEMMA_SFT_CACHE/data` (~/.cache/gemma-sft/data); deleting that
folder is always safe.
"""

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from gemma_sft import cache_dir
from gemma_sft.publish import publish_dir, remove_stale, temporary_prefix

_CODE = None


def root() -> Path:
    return Path(os.environ.get("GEMMA_SFT_DATA_CACHE") or cache_dir() / "data")


def digest(*parts) -> str:
    """A short stable digest of strings, bytes and JSON-able values."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, ensure_ascii=False).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def code_digest() -> str:
    """The data code's own digest: a change to how rows are converted or tokenized invalidates every entry."""
    global _CODE
    if _CODE is None:
        here = Path(__file__).parent
        _CODE = digest(*(path.read_bytes() for path in sorted(here.glob("*.py"))))  # every module of data/
    return _CODE


def tokenizer_digest(tokenizer) -> str:
    """The vocabulary, special tokens and chat template: what decides the token ids and the answer mask."""
    known = getattr(tokenizer, "_gemma_sft_digest", None)
    if known:
        return known
    file = Path(str(getattr(tokenizer, "name_or_path", ""))) / "tokenizer.json"
    vocabulary = file.read_bytes() if file.is_file() else tokenizer.backend_tokenizer.to_str().encode()
    import transformers

    value = digest(
        vocabulary, type(tokenizer).__name__, tokenizer.chat_template or "", tokenizer.special_tokens_map,
        bool(getattr(tokenizer, "add_bos_token", False)), transformers.__version__,
    )  # fmt: skip
    with contextlib.suppress(AttributeError):  # computed once per tokenizer object
        tokenizer._gemma_sft_digest = value
    return value


MANIFEST = "manifest.json"  # written last: each other file of an entry with its size and checksum
_SWEPT: set[Path] = set()


def cached(kind: str, key: str, build, *, enabled: bool = True):
    """The dataset and metadata stored as `kind/key`; `build(scratch)` makes them (a Dataset and a JSON-able dict,
    using the folder `scratch` for intermediate files) when absent. Concurrent builders (several ranks, parallel
    tests) wait for one. Every read checks the entry against its manifest; a damaged or incomplete entry is rebuilt,
    with one line saying so. With `enabled` false the entry goes to a temporary folder removed at exit."""
    from datasets import load_from_disk

    folder = root() / kind if enabled else Path(_session_dir()) / kind
    target = folder / key
    if folder not in _SWEPT:  # once per process: what killed preparations left behind
        _SWEPT.add(folder)
        remove_stale(folder)

    def fill(staging: Path) -> None:
        scratch = Path(tempfile.mkdtemp(prefix=temporary_prefix(target, "scratch"), dir=staging.parent))
        try:
            dataset, meta = build(scratch)
            dataset.save_to_disk(str(staging / "rows"))
            (staging / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
            write_manifest(staging)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def intact(entry: Path) -> bool:
        problem = check_entry(entry)
        if problem:
            print(f"data cache: {entry} {problem}; rebuilding it", file=sys.stderr, flush=True)
        return not problem

    # Checked first without the lock, so that readers (several ranks) hash at once; a damaged entry is checked again
    # under the lock, where only one process rebuilds it.
    if not target.is_dir() or check_entry(target):
        publish_dir(fill, target, lock=True, intact=intact)
    meta = json.loads((target / "meta.json").read_text())
    return load_from_disk(str(target / "rows")), meta


def write_manifest(entry: Path) -> None:
    """List every file of a finished entry with its size and checksum: the last file written."""
    files = sorted(path for path in entry.rglob("*") if path.is_file() and path.name != MANIFEST)
    listing = {path.relative_to(entry).as_posix(): [path.stat().st_size, _checksum(path)] for path in files}
    (entry / MANIFEST).write_text(json.dumps({"files": listing}, indent=0))


def check_entry(entry: Path) -> str | None:
    """What is wrong with a cache entry (None: every file its manifest lists is there, whole and unchanged)."""
    try:
        listing = json.loads((entry / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "is incomplete (no readable manifest: an interrupted or older write)"
    for name, (size, checksum) in listing.items():
        path = entry / name
        try:
            if path.stat().st_size != size:
                return f"is damaged ({name} has changed size)"
            if _checksum(path) != checksum:
                return f"is damaged ({name} does not match its checksum)"
        except OSError:
            return f"is incomplete ({name} is missing)"
    return None


def _checksum(path: Path) -> str:
    # sha256: every byte, at about 0.8 GB/s on one core with the CPU's SHA instructions (blake2b: 0.3 GB/s)
    h, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while size := file.readinto(buffer):
            h.update(view[:size])
    return h.hexdigest()


_SESSION = None


def _session_dir() -> str:
    global _SESSION
    if _SESSION is None:
        import atexit

        _SESSION = tempfile.mkdtemp(prefix="gemma-sft-data-")
        atexit.register(shutil.rmtree, _SESSION, ignore_errors=True)
    return _SESSION
