"""Resuming an interrupted run honestly: with the settings it started with, up to exactly its last step.

A run writes its resolved recipe to output_dir/start_recipe.yaml when it starts. A resume compares the recipe it is
given with that one: the checkpoint's optimizer, schedule, place in the data and weights were made with the old
settings and would silently win over changed ones, so a changed setting is refused, naming the keys, unless
`--resume_with_changed_settings true` says the change is meant. Keys that only change how a run is logged, saved,
evaluated or how fast it goes (FREE) may change.

The Trainer, resumed from a checkpoint that already holds every step, trains one more (with max_steps) or none and
reports a loss of 0 (with epochs); such a checkpoint is taken as the result instead. Its train_loss counts only the
steps trained since the resume; it is recomputed over the whole run.
"""

import os
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from gemma_sft.errors import UserError

START_RECIPE = "start_recipe.yaml"

# Settings free to change on a resume: where and how often the run logs, saves and evaluates, what it reports, and
# how fast it goes (the speed switches keep the arithmetic), never what it trains.
FREE = {
    "output_dir", "overwrite_output_dir", "resume_with_changed_settings", "eval_report", "dry_run", "logging_dir",
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level", "report_to",
    "run_name", "disable_tqdm", "save_steps", "save_strategy", "save_total_limit", "save_only_model",
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
    "eval_accumulation_steps", "include_num_input_tokens_seen", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_private_repo", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor",
    "dataloader_persistent_workers", "dataset_num_proc", "data_cache", "fast_answer_mask", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "torch_compile",
}  # fmt: skip


def record_start(output_dir: str, resolved: dict) -> None:
    """Write the recipe a fresh run starts with (one process writes it, whole or not at all)."""
    if os.environ.get("RANK", "0") != "0":
        return
    path = Path(output_dir) / START_RECIPE
    text = yaml.safe_dump(resolved, allow_unicode=True, sort_keys=False)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(
        "# The recipe this run started with (resume.py compares a resume's with it).\n" + text, encoding="utf-8"
    )
    os.replace(partial, path)


def check_settings(recipe, checkpoint: str | None) -> str:
    """Before resuming `checkpoint`: refuse settings changed since the run started, unless the recipe allows them.
    Returns what changed (for the saved recipe), "" when nothing did or nothing is resumed."""
    if not checkpoint:
        return ""
    output_dir = recipe.training.output_dir
    started = _read_start(Path(output_dir) / START_RECIPE)
    if started is None:
        _say(f"{output_dir}: no readable {START_RECIPE} (a run started by an older version): resuming "
             f"{checkpoint} without comparing its settings")  # fmt: skip
        return ""
    changes = changed_settings(recipe, started)
    if not changes:
        return ""
    listed = "; ".join(changes)
    kept = "the checkpoint's optimizer, schedule and place in the data are kept"
    if not recipe.run.resume_with_changed_settings:
        raise UserError(
            f"{output_dir}: settings changed since this run started ({START_RECIPE}), which resuming "
            f"{Path(checkpoint).name} would silently override: {listed}. Resume with the run's settings, start "
            f"afresh with --overwrite_output_dir true, or pass --resume_with_changed_settings true ({kept})"
        )
    note = f"Resumed from {Path(checkpoint).name} with settings changed since the run started: {listed}; {kept}"
    _say(note)
    return note


def changed_settings(recipe, started: dict) -> list[str]:
    """`key old -> new` for each setting, outside FREE, whose value differs from the recipe the run started with."""
    from gemma_sft.config import _plain

    owners = {}
    for args in (recipe.model, recipe.training, recipe.data, recipe.run, recipe.speed):
        owners.update({f.name: (args, f) for f in fields(args) if f.init})
    speed = {f.name for f in fields(recipe.speed)}
    changes = []
    for key in dict.fromkeys([*started, *recipe.resolved]):
        if key in FREE or key in speed or key not in owners:
            continue
        args, spec = owners[key]
        now = recipe.resolved[key] if key in recipe.resolved else _plain(getattr(args, key))
        if key in started:
            before = started[key]
        elif spec.default is not MISSING:  # not written at the start: it had its default then
            before = _plain(spec.default)
        else:
            continue
        if before != now:
            changes.append(f"{key} {_short(before)} -> {_short(now)}")
    return changes


def train(trainer, checkpoint: str | None):
    """trainer.train(), resuming from `checkpoint`, to exactly the run's last step and with the whole run's loss."""
    if not checkpoint:
        return trainer.train()
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    total = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    # FSDP and DeepSpeed load weights only into the wrapped model that training sets up: they go through train()
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if state.global_step >= total and not sharded:
        trainer.accelerator.print(f"{checkpoint} holds all {total} steps: it is the result, nothing more to train")
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = state
        loss = whole_run_loss(state, checkpoint_step=state.global_step)  # None where no loss was logged
        metrics = {"epoch": state.epoch, **({"train_loss": loss} if loss is not None else {})}
        return TrainOutput(state.global_step, loss, metrics)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    # transformers divides the loss summed over this session's steps by every step of the run
    loss = whole_run_loss(trainer.state, state.global_step, result.training_loss * result.global_step)
    if trainer.state.log_history and "train_loss" in trainer.state.log_history[-1]:
        trainer.state.log_history[-1]["train_loss"] = loss
    return TrainOutput(result.global_step, loss, {**result.metrics, "train_loss": loss})


def whole_run_loss(state, checkpoint_step: int, session_sum: float = 0.0) -> float | None:
    """The mean training loss of a resumed run: the losses logged up to the checkpoint (each the mean of the steps
    since the log before it), then the steps trained since (`session_sum`, their summed losses)."""
    total, counted, previous = 0.0, 0, 0
    for entry in state.log_history:
        if "loss" in entry and previous < entry["step"] <= checkpoint_step:
            total += entry["loss"] * (entry["step"] - previous)
            counted, previous = counted + entry["step"] - previous, entry["step"]
    counted += state.global_step - checkpoint_step
    return (total + session_sum) / counted if counted else None


def _read_start(path: Path) -> dict | None:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return values if isinstance(values, dict) else None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)
