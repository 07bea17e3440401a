"""Value checks of a recipe, made before any data or model loads (the dry run included): the recipe's encoding, each
value's type (YAML writes `3.7` or `yes` where argparse would have refused them) and range. Each problem is one line
naming the file, line and key, or the command-line flag."""

import math
import types
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from gemma_sft.errors import UserError


def read_text(path: Path, what: str = "recipe") -> str:
    """A text file that must be UTF-8, or one line naming the line of the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {exc.start}); save the {what} as UTF-8") from None


def key_lines(text: str) -> dict[str, int]:
    """The line of each top-level key of a YAML mapping."""
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in root.value}


def _kind(hint) -> tuple[type | None, bool]:
    """(int, float or bool, or None for other fields; whether None is allowed)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    nullable = type(None) in args
    rest = [arg for arg in args if arg is not type(None)]
    return (rest[0] if len(rest) == 1 and rest[0] in (int, float, bool) else None), nullable


def field_kinds(dataclasses) -> dict[str, tuple[type | None, bool]]:
    kinds = {}
    for cls in dataclasses:
        hints = typing.get_type_hints(cls)
        kinds.update({f.name: _kind(hints[f.name]) for f in fields(cls) if f.init})
    return kinds


def check_types(recipe: dict, path, lines: dict[str, int], dataclasses) -> None:
    """The recipe's YAML-typed values against their fields: a whole number where an integer is meant (2000.0 is taken
    as 2000), a number where a float is, true or false where a switch is. Strings are argparse's to convert."""
    kinds = field_kinds(dataclasses)
    for key, value in recipe.items():
        kind, nullable = kinds.get(key, (None, True))
        if kind is None or isinstance(value, str) or (value is None and nullable):
            continue
        place = f"{path}:{lines[key]}" if key in lines else str(path)
        if kind is bool and not isinstance(value, bool):
            raise UserError(f"{place}: {key} must be true or false (got {value!r})")
        if kind is int and isinstance(value, float) and value.is_integer():
            recipe[key] = int(value)
        elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{place}: {key} must be a whole number (got {value!r})")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{place}: {key} must be a number (got {value!r})")


def _at_least(low):
    return lambda value: value is None or value >= low


def _between(low, high):  # low <= value < high
    return lambda value: value is None or low <= value < high


# What a value must be: the test, and the words for the error. A value that cannot work fails here, before minutes of
# loading, not as a traceback from the optimizer or the data code (or silently, as a learning rate of 0 would).
RANGES = {
    "learning_rate": (lambda value: value > 0, "must be above 0"),
    "max_samples": (_at_least(0), "must be 0 (all rows) or more"),
    "eval_samples": (_at_least(0), "must be 0 or more"),
    "report_prompts": (_at_least(0), "must be 0 (no generations) or more"),
    "report_max_new_tokens": (_at_least(1), "must be 1 or more"),
    "max_steps": (lambda value: value != 0, "must be above 0 (or -1: num_train_epochs decides)"),
    "per_device_train_batch_size": (_at_least(1), "must be 1 or more"),
    "per_device_eval_batch_size": (_at_least(1), "must be 1 or more"),
    "gradient_accumulation_steps": (_at_least(1), "must be 1 or more"),
    "max_length": (_at_least(1), "must be 1 or more"),
    "warmup_steps": (_at_least(0), "must be 0 or more"),
    "weight_decay": (_at_least(0), "must be 0 or more"),
    "max_grad_norm": (_at_least(0), "must be 0 (no clipping) or more"),
    "adam_beta1": (_between(0, 1), "must be at least 0 and below 1"),
    "adam_beta2": (_between(0, 1), "must be at least 0 and below 1"),
    "adam_epsilon": (_at_least(0), "must be 0 or more"),
    "lora_r": (_at_least(1), "must be 1 or more"),
    "lora_dropout": (_between(0, 1), "must be at least 0 and below 1"),
    "logging_steps": (lambda value: value > 0, "must be above 0"),
    "save_steps": (lambda value: value > 0, "must be above 0"),
    "eval_steps": (lambda value: value is None or value > 0, "must be above 0"),
    "seed": (_between(0, 2**32), "must be between 0 and 4294967295"),
    "dataset_num_proc": (_at_least(1), "must be 1 or more"),
    "dataloader_num_workers": (_at_least(0), "must be 0 or more"),
    "kept_layers": (_at_least(0), "must be 0 (every layer recomputed) or more"),
}


def check_ranges(values: dict, places: dict[str, str]) -> None:
    """The final values of the keys the recipe or the command line set (`places`: where each was set)."""

    def fail(key, words):
        raise UserError(f"{places[key]} {words} (got {values[key]!r})")

    for key, (test, words) in RANGES.items():
        if key not in places or key not in values:
            continue
        value = values[key]
        if (isinstance(value, float) and math.isnan(value)) or not test(value):
            fail(key, words)
    epochs = values.get("num_train_epochs")
    if "num_train_epochs" in places and values.get("max_steps", -1) < 0 and not epochs > 0:
        fail("num_train_epochs", "must be above 0 (or set max_steps)")


def places_of(recipe_keys, path, lines: dict[str, int], flags) -> dict[str, str]:
    """Where each key was set, as an error names it: the recipe's file and line, or the flag (which wins)."""
    places = {key: f"{path}:{lines[key]}: {key}" if key in lines else f"{path}: {key}" for key in recipe_keys}
    places.update({key: f"command line: --{key}" for key in flags})
    return places


def check_held_out_rows(source: str, asked: int, usable: int) -> None:
    """A separate held-out file must hold the eval_samples rows asked for (fewer would be used without a word)."""
    if asked and usable < asked:
        raise UserError(
            f"{source}: eval_samples={asked} but the file has only {usable} usable rows; lower eval_samples "
            "(0 = all of them)"
        )
