"""Did the adapter help? Answer-token loss and perplexity for base and adapter, greedy generations side by side,
the training loss curve, all in one markdown report."""

import json
import math
from pathlib import Path

from gemma_sft.inference.generate import generate
from gemma_sft.inference.score import answer_loss, by_category, unpacked_attention

WHAT_TO_TRY = (
    "try a lower learning_rate or fewer epochs, more training rows that look like the held-out ones (their length "
    "and kind of task), and check that the held-out rows are the kind of data the adapter is meant for"
)


def warnings_for(base: dict, tuned: dict, base_categories: dict, tuned_categories: dict) -> list[str]:
    """Plain sentences for each way the adapter is worse than the base model on held-out rows."""
    found = []
    if tuned["loss"] > base["loss"]:
        found.append(f"the adapter is worse than the base model on the held-out rows ({base['loss']:.4f} -> "
                     f"{tuned['loss']:.4f})")  # fmt: skip
    worse = [name for name in tuned_categories if tuned_categories[name] > base_categories[name]]
    if worse:
        shown = ", ".join(f"{name} ({base_categories[name]:.4f} -> {tuned_categories[name]:.4f})" for name in worse)
        found.append(f"the adapter is worse than the base model on {len(worse)} categor"
                     f"{'y' if len(worse) == 1 else 'ies'}: {shown}")  # fmt: skip
    return found


def plot_loss_curve(trainer_state: Path, png: Path) -> bool:
    """Training (and eval, when logged) loss against step, from the Trainer's log history."""
    if not trainer_state.is_file():
        return False
    history = json.loads(trainer_state.read_text(encoding="utf-8")).get("log_history", [])
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and math.isfinite(h["loss"])]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    axis.plot(*zip(*train), label="train loss", marker="." if len(train) < 30 else None)
    if evals:
        axis.plot(*zip(*evals), label="eval loss", marker="o")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (answer tokens)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)
    return True


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def compare(
    model,
    tokenizer,
    conversations,
    adapter_dir: Path,
    num_prompts: int = 5,
    max_new_tokens: int = 128,
    categories: list[str | None] | None = None,
) -> dict:
    """Evaluate base (adapter disabled) and adapter on the same rows; write report.md and loss_curve.png.

    With `categories` (one per row, None where a row has none) the losses are also broken down by category, and the
    report warns where the adapter is worse than the base model, overall or on any category."""
    shown = conversations[:num_prompts]
    last_answer = [max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in shown]
    prompts = [c[:at] for c, at in zip(shown, last_answer)]
    references = [c[at]["content"] for c, at in zip(shown, last_answer)]
    with unpacked_attention(model):
        with model.disable_adapter():
            base = answer_loss(model, tokenizer, conversations)
            base_answers = generate(model, tokenizer, prompts, max_new_tokens) if prompts else []
        tuned = answer_loss(model, tokenizer, conversations)
        tuned_answers = generate(model, tokenizer, prompts, max_new_tokens) if prompts else []

    adapter_dir = Path(adapter_dir)
    has_curve = plot_loss_curve(adapter_dir / "trainer_state.json", adapter_dir / "loss_curve.png")
    change = 100 * (tuned["loss"] - base["loss"]) / base["loss"]
    categories = categories or [None] * len(conversations)
    base_categories, tuned_categories = by_category(base, categories), by_category(tuned, categories)
    warnings = warnings_for(base, tuned, base_categories, tuned_categories)
    lines = [
        f"# Evaluation of `{adapter_dir}`",
        "",
        f"{base['rows']} held-out rows, {base['tokens']:,} answer tokens (each answer and its `<end_of_turn>`).",
        "",
        "| model | answer loss | perplexity |",
        "|---|---|---|",
        f"| base | {base['loss']:.4f} | {base['perplexity']:.2f} |",
        f"| base + adapter | {tuned['loss']:.4f} | {tuned['perplexity']:.2f} |",
        "",
        f"Change in answer loss: {change:+.1f}%.",
        "",
    ]
    if warnings:
        lines += [f"**Warning: {text}.** What to try: {WHAT_TO_TRY}." for text in warnings] + [""]
    if tuned_categories:
        counts = {name: categories.count(name) for name in tuned_categories}
        lines += ["| category | rows | base | base + adapter | change |", "|---|---|---|---|---|"]
        for name, after in tuned_categories.items():
            before = base_categories[name]
            lines.append(
                f"| {name} | {counts[name]} | {before:.4f} | {after:.4f} | {100 * (after - before) / before:+.1f}% |"
            )
        lines.append("")
    if has_curve:
        lines += ["![training loss](loss_curve.png)", ""]
    if prompts:
        lines += ["## Greedy generations", "", "| prompt | reference | base | base + adapter |", "|---|---|---|---|"]
        for prompt, reference, before, after in zip(prompts, references, base_answers, tuned_answers):
            lines.append(f"| {_cell(prompt[-1]['content'])} | {_cell(reference)} | {_cell(before)} | {_cell(after)} |")
        lines.append("")
    (adapter_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    drop = ("per_row",)
    results = {
        "base": {k: v for k, v in base.items() if k not in drop},
        "adapter": {k: v for k, v in tuned.items() if k not in drop},
        "loss_change_percent": change,
        "categories": {
            name: {"base": base_categories[name], "adapter": tuned_categories[name]} for name in tuned_categories
        },
        "warnings": warnings,
    }
    (adapter_dir / "eval_report.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    summary = (
        f"Held-out answer loss: base {base['loss']:.4f} (ppl {base['perplexity']:.2f}) -> adapter "
        f"{tuned['loss']:.4f} (ppl {tuned['perplexity']:.2f}), {change:+.1f}% over {base['tokens']:,} tokens; "
        f"report: {adapter_dir / 'report.md'}"
    )
    summary += "".join(f"\nWARNING: {text}. What to try: {WHAT_TO_TRY}." for text in warnings)
    return {**results, "summary": summary, "generations": list(zip(prompts, base_answers, tuned_answers))}
