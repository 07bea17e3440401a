"""Sampling: held-out and training rows drawn at random with a seed, tokenized, overlong rows counted; and the same
from a stream for sets larger than the disk."""

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from gemma_sft.checks import check_held_out_rows
from gemma_sft.data import tables
from gemma_sft.data.answer_mask import tokenize_many
from gemma_sft.data.formats import Skip, category_of, detect_format, to_messages
from gemma_sft.data.sources import stream_records
from gemma_sft.data.tables import Column, Conversations, load_conversations, tokenize_rows
from gemma_sft.errors import UserError

STREAM_BUFFER = 10_000  # rows a streamed source is shuffled within


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
        size = min(len(order) - at, need + need // 16 + tables.TOKENIZE_BATCH // 4)
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

    for record in _shuffled(counted(stream_records(source, config, split)), seed, STREAM_BUFFER):
        fmt = fmt or detect_format(record)
        try:
            pending.append((to_messages(record, fmt, system_prompt), category_of(record)))
        except Skip as reason:
            skipped[str(reason)] += 1
        if len(pending) == tables.TOKENIZE_BATCH or len(kept) + len(pending) >= wanted:
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
        check_held_out_rows(separate_eval, settings["eval_samples"], len(held_out.train))
        prepared.eval, prepared.eval_messages = held_out.train, list(held_out.train_messages)
        prepared.eval_categories = list(held_out.train_categories)
    return prepared
