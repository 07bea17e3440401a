"""The on-disk cache of prepared data: converted and tokenized rows as memory-mapped Arrow tables.

An entry is found by a digest of everything its contents depend on: the data's bytes (a local file) or the Hub
dataset's fingerprint, the tokenizer's vocabulary and chat template, the settings that change the rows, and the code
that made them (this package's data modules). Change any of them and a new entry is built; nothing stale is reused.
Entries live under GEMMA_SFT_DATA_CACHE, default `GEMMA_SFT_CACHE/data` (~/.cache/gemma-sft/data); deleting that
folder is always safe.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from gemma_sft import cache_dir
from gemma_sft.publish import publish_dir

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


def cached(kind: str, key: str, build, *, enabled: bool = True):
    """The dataset and metadata stored as `kind/key`; `build(scratch)` makes them (a Dataset and a JSON-able dict,
    using the folder `scratch` for intermediate files) when absent. Concurrent builders (several ranks, parallel
    tests) wait for one. With `enabled` false the entry goes to a temporary folder removed at exit."""
    from datasets import load_from_disk

    target = root() / kind / key if enabled else Path(_session_dir()) / kind / key

    def fill(staging: Path) -> None:
        scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=staging.parent))
        try:
            dataset, meta = build(scratch)
            dataset.save_to_disk(str(staging / "rows"))
            (staging / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    publish_dir(fill, target, lock=True)
    meta = json.loads((target / "meta.json").read_text())
    return load_from_disk(str(target / "rows")), meta


_SESSION = None


def _session_dir() -> str:
    global _SESSION
    if _SESSION is None:
        import atexit

        _SESSION = tempfile.mkdtemp(prefix="gemma-sft-data-")
        atexit.register(shutil.rmtree, _SESSION, ignore_errors=True)
    return _SESSION
