"""The summary printed before training: rows read, kept and skipped, token counts, and the first example with the
tokens its loss covers."""

import statistics

from gemma_sft.data.formats import FORMATS
from gemma_sft.data.sampling import PreparedData


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
