"""Recipes: a YAML file of TRL field names gives the defaults, command-line flags override them."""

import argparse
import difflib
import enum
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import yaml
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from gemma_sft import UserError, checks, plan

# The flags of the original single-script tool, kept so its users' commands keep working.
FLAG_ALIASES = {
    "--model_path": "--model_name_or_path",
    "--data_path": "--dataset_name",
    "--streaming": "--dataset_streaming",
    "--epochs": "--num_train_epochs",
    "--batch_size": "--per_device_train_batch_size",
    "--output_path": "--output_dir",
}


@dataclass
class DataArguments(ScriptArguments):
    """TRL's script arguments plus how to sample, filter and hold out the data."""

    max_samples: int = field(default=2000, metadata={"help": "Training rows drawn at random with `seed`; 0 = all."})
    eval_samples: int = field(default=100, metadata={"help": "Held-out rows, disjoint from the training rows."})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A separate held-out data file: eval_samples rows are drawn from it (0 = all of it) and none are "
            "split off the training data."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message for rows that have none (Belle rows never do)."}
    )
    drop_overlong: bool = field(
        default=True,
        metadata={"help": "Skip (and count) rows longer than max_length rather than cut off their answer."},
    )
    data_cache: bool = field(
        default=True,
        metadata={
            "help": "Keep checked and tokenized rows on disk (GEMMA_SFT_CACHE/data, default ~/.cache/gemma-sft/data) "
            "so a run with the same data, tokenizer, template and settings starts at once."
        },
    )
    fast_answer_mask: bool = field(
        default=True,
        metadata={
            "help": "Find the answer tokens from each token's length in bytes instead of asking the tokenizer for "
            "character offsets (data/answer_mask.py): the same ids and mask, tokenized sooner."
        },
    )


@dataclass
class RunArguments:
    """What a run of sft.py does besides training."""

    eval_report: bool = field(
        default=True,
        metadata={
            "help": "After training, compare base and adapter on the held-out rows (output_dir/report.md). false: no "
            "evaluation after training at all, unless eval_strategy asks for the Trainer's own."
        },
    )
    report_prompts: int = field(
        default=5, metadata={"help": "Held-out prompts the report answers greedily with base and adapter (0: none)."}
    )
    report_max_new_tokens: int = field(
        default=128, metadata={"help": "The longest answer, in tokens, of each of the report's greedy generations."}
    )
    dry_run: bool = field(
        default=False, metadata={"help": "Check and tokenize the data, print a summary, exit without training."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow replacing a finished adapter already in output_dir."}
    )
    resume_with_changed_settings: bool = field(
        default=False,
        metadata={
            "help": "Resume an interrupted run although settings its checkpoint carries (learning rate, schedule, "
            "batch shape, data...) changed since it started; the checkpoint's optimizer, schedule and place in the "
            "data are kept (resume.py)."
        },
    )


@dataclass
class SpeedArguments:
    """Switches for the speed-ups that replace part of another library (patches/registry.py, one entry each), and
    merge_micro_batches and kept_layers, which replace none. Each keeps the arithmetic but fp8_base_matmuls, which
    rounds the frozen weight's products through FP8; turn one off to compare, or if a library upgrade moved what it
    replaces."""

    fused_qlora: bool = field(
        default=True,
        metadata={
            "help": "Train each 4-bit LoRA layer as one autograd function instead of PEFT's chain of small kernels "
            "(gemma_sft/patches/fused_qlora.py). Not under FSDP or DeepSpeed ZeRO-3."
        },
    )
    lora_dropout_in_kernels: bool = field(
        default=True,
        metadata={
            "help": "With fused_qlora on a GPU, draw LoRA dropout inside the adapter's kernels (same distribution as "
            "PEFT's, its own random stream) instead of making a dropped copy of the input."
        },
    )
    fp8_base_matmuls: bool = field(
        default=False,
        metadata={
            "help": "With fused_qlora on a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper): the "
            "frozen 4-bit weight's matmuls in FP8 (e4m3, a power-of-two scale per row of each operand), twice bf16's "
            "matmul rate; the adapter and its gradients stay in bf16. Changes the rounding, unlike the other "
            "switches, and as built runs slower than bf16 (patches/fp8_matmul.py); elsewhere bf16 as before."
        },
    )
    keep_mlp_outputs: bool = field(
        default=True,
        metadata={
            "help": "With gradient checkpointing and fused_qlora, keep each decoder layer's MLP output (its down "
            "projection) instead of recomputing it in the backward pass: faster, for 2 bytes x hidden size per token "
            "per layer. Not with torch_compile."
        },
    )
    keep_qkv_outputs: bool = field(
        default=False,
        metadata={
            "help": "As keep_mlp_outputs, for each decoder layer's query, key and value projections: faster, for 2 "
            "bytes x (query + key + value widths) per token per layer (4,096 values on the 4B)."
        },
    )
    offload_activations: bool = field(
        default=False,
        metadata={
            "help": "On a GPU, with gradient checkpointing: hold each decoder layer's saved input in pinned host "
            "memory instead of on the GPU, copied on a side stream while the layers compute (2 bytes x hidden size "
            "per token per layer less GPU memory, the same bytes over PCIe each way; patches/offload_activations.py)."
        },
    )
    offload_kept_outputs: bool = field(
        default=False,
        metadata={
            "help": "With offload_activations and keep_mlp_outputs: the kept MLP outputs (and those of "
            "keep_qkv_outputs) wait in pinned host memory too, brought back a layer ahead of their recomputation (as "
            "many bytes again as the layer inputs, 1.6 times that for the query, key and value outputs)."
        },
    )
    block_masks_without_compile: bool = field(
        default=True,
        metadata={
            "help": "Build flex_attention's block masks in bands of query rows, eagerly, instead of through "
            "torch.compile: the same masks without minutes of compilation on a fresh machine at long rows "
            "(gemma_sft/patches/block_masks.py)."
        },
    )
    fused_output_head: bool = field(
        default=True,
        metadata={
            "help": "Compute the output head's gradient in its forward pass instead of projecting onto the "
            "vocabulary again in the backward pass (gemma_sft/patches/output_head.py)."
        },
    )
    pack_in_one_pass: bool = field(
        default=True,
        metadata={"help": "Pack the whole dataset at once (one part-filled row) instead of in batches of 1,000."},
    )
    tuned_flex_attention: bool = field(
        default=True,
        metadata={"help": "flex_attention with the kernel options measured faster on this card (attention.py)."},
    )
    qk_norm_in_stored_layout: bool = field(
        default=True,
        metadata={"help": "Apply the query/key norms in the projection's stored layout, skipping two copies."},
    )
    kept_layers: int = field(
        default=0,
        metadata={
            "help": "With gradient checkpointing: this many decoder layers, evenly spaced, keep their activations "
            "instead of recomputing them in the backward pass. Faster by the recomputation skipped, the same "
            "arithmetic, for GPU memory per layer in proportion to the tokens per step (docs/PERFORMANCE.md, The "
            "speed and memory curve); 0 recomputes every layer, the model's layer count or more keeps them all. "
            "`make train` sets it from the card's memory (gemma_sft/hardware.py)."
        },
    )
    merge_micro_batches: bool = field(
        default=True,
        metadata={
            "help": "Unpacked, with gradient accumulation: run several accumulated micro-batches as one padded batch "
            "(same samples and loss per optimizer step, up to 16,384 padded tokens; gemma_sft/trainer.py)."
        },
    )
    cuda_graphs: bool = field(
        default=True,
        metadata={
            "help": "On one GPU: capture the language model's forward and backward passes as CUDA graphs once per "
            "batch shape and replay them, instead of issuing each layer's kernels from Python on every step; packed "
            "rows under flex_attention keep their block masks in place for it (gemma_sft/patches/cuda_graphs.py)."
        },
    )
    async_steps: bool = field(
        default=True,
        metadata={
            "help": "On one process: keep TRL's per-step metrics and the Trainer's token count on the GPU until a log "
            "or checkpoint reads them, count the supervised positions when the batch is built (for the fused output "
            "head), copy batches without blocking and log a NaN loss as it is, so that the host queues the next step "
            "while the GPU works (gemma_sft/patches/async_steps.py)."
        },
    )
    fsdp_checkpoint_fixes: bool = field(
        default=True,
        metadata={"help": "Under FSDP: make checkpoints hold and restore the adapter and the optimizer's state."},
    )


class Recipe(NamedTuple):
    data: DataArguments
    training: SFTConfig
    model: ModelConfig
    resolved: dict  # the recipe's keys, the sampling keys and the flags given, with their final values
    run: RunArguments
    speed: SpeedArguments
    plan: "plan.Plan"  # what the recipe became here (plan.py); completed once the rows are known


DATACLASSES = (DataArguments, SFTConfig, ModelConfig, RunArguments, SpeedArguments)
# Always written to the resolved recipe, so the held-out rows can be drawn again (evaluate.py) from it alone.
SAMPLING_KEYS = (
    "dataset_name", "dataset_config", "dataset_train_split", "max_samples", "eval_samples", "max_length", "seed",
    "system_prompt", "drop_overlong", "model_name_or_path", "eval_dataset_name", "dataset_num_proc",
    "dataset_streaming", "data_cache", "fast_answer_mask",
)  # fmt: skip


class RecipeParser(TrlParser):
    """TrlParser whose errors are one clear line instead of a usage dump, and which takes no abbreviated flags
    (`--num_train_epoch` is a typo to report, not a prefix to guess from)."""

    def __init__(self, dataclass_types):
        super().__init__(dataclass_types, allow_abbrev=False)

    def error(self, message):
        raise UserError(f"command line: {message}")


def _known_fields() -> set[str]:
    return {f.name for cls in DATACLASSES for f in fields(cls) if f.init}


def rewrite_aliases(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        out.append(FLAG_ALIASES.get(flag, flag) + sep + value if flag in FLAG_ALIASES else arg)
    return out


def load_recipe(path: str | Path) -> dict:
    """Read a recipe, failing with file:line on YAML errors and unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    text = checks.read_text(path)
    try:
        root = yaml.compose(text)
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}: a recipe must be a mapping of field names to values")
    known = _known_fields() | {"env"}
    for key_node, _ in root.value:
        key = key_node.value
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{path}:{key_node.start_mark.line + 1}: unknown recipe key '{key}'{hint}")
    return values


def _check_value_types(parser: RecipeParser, recipe: dict, path: str) -> None:
    """Convert string values the way argparse would, so a bad value is reported against the recipe, not the CLI."""
    actions = {action.dest: action for action in parser._actions}
    for key, value in recipe.items():
        action = actions.get(key)
        if action is None or not isinstance(value, str) or not callable(action.type):
            continue
        try:
            action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            kind = getattr(action.type, "__name__", "valid")
            raise UserError(f"{path}: field '{key}': invalid value {value!r} ({kind} expected)") from None
        if action.choices and value not in action.choices:
            raise UserError(f"{path}: field '{key}': {value!r} is not one of {list(action.choices)}")


def parse(argv: list[str] | None = None) -> Recipe:
    """Parse `RECIPE.yaml [--field value ...]` into the argument objects and the explicitly set values."""
    argv = rewrite_aliases(list(sys.argv[1:] if argv is None else argv))
    recipe_path = None
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        recipe_path = argv.pop(0)
    elif "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise UserError("command line: --config needs a recipe path")
        recipe_path = argv[at + 1]
        del argv[at : at + 2]

    recipe = load_recipe(recipe_path) if recipe_path else {}
    for name, value in (recipe.pop("env", None) or {}).items():
        os.environ[str(name)] = str(value)

    parser = RecipeParser(DATACLASSES)
    _check_value_types(parser, recipe, recipe_path)
    lines = checks.key_lines(checks.read_text(Path(recipe_path))) if recipe_path else {}
    checks.check_types(recipe, recipe_path, lines, DATACLASSES)
    parser.set_defaults_with_config(**recipe)
    try:
        data_args, training_args, model_args, run_args, speed_args, unknown = parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True
        )
    except ValueError as exc:
        where = recipe_path or "command line"
        if "bf16" not in str(exc):
            raise UserError(f"{where}: {str(exc).splitlines()[0]}") from None
        # A dry run never trains, so it may check a GPU recipe's data on a laptop.
        data_args, training_args, model_args, run_args, speed_args, unknown = parser.parse_args_into_dataclasses(
            [*argv, "--bf16", "false"], return_remaining_strings=True
        )
        if not run_args.dry_run and not unknown:  # an unknown flag is the clearer error
            raise UserError(
                f"{where}: bf16 needs a GPU that supports it and none was found; on CPU use "
                "recipes/gemma3_270m_belle_demo.yaml, or pass --bf16 false --dtype float32 --load_in_4bit false"
            ) from None
    if unknown:
        flag = next((arg for arg in unknown if arg.startswith("-")), unknown[0])
        close = difflib.get_close_matches(flag.lstrip("-").split("=")[0], sorted(_known_fields()), n=1)
        hint = f" (did you mean '--{close[0]}'?)" if close else ""
        raise UserError(f"command line: unknown flag '{flag}'{hint}")

    # the recipe's keys, then the flags given, with their final values (flags win)
    flags = [arg[2:].split("=")[0] for arg in argv if arg.startswith("--")]
    owners = {key: obj for obj in (model_args, training_args, data_args, run_args, speed_args) for key in vars(obj)}
    places = checks.places_of(recipe, recipe_path, lines, [flag for flag in flags if flag in owners])
    checks.check_ranges({key: getattr(owners[key], key) for key in places}, places)
    keys = dict.fromkeys([*recipe, *SAMPLING_KEYS, *flags])
    resolved = {key: _plain(getattr(owners[key], key)) for key in keys if key in owners}
    if "include_num_input_tokens_seen" in resolved:  # transformers turns true/false into "all"/"no", which its own
        resolved["include_num_input_tokens_seen"] = resolved["include_num_input_tokens_seen"] != "no"  # parser refuses

    # A recipe's held-out file belongs to the recipe's data: other data given on the command line (without an
    # eval_dataset_name of its own) has its held-out rows split off itself.
    if data_args.eval_dataset_name and "dataset_name" in flags and "eval_dataset_name" not in flags:
        data_args.eval_dataset_name = resolved["eval_dataset_name"] = None

    # What the recipe becomes before any data is read (row shape, attention, token counting): decided in plan.py
    settled = plan.settle_recipe(training_args, model_args, set(flags), resolved)
    return Recipe(data_args, training_args, model_args, resolved, run_args, speed_args, settled)


def _plain(value):
    """A YAML-friendly copy of a parsed value (enums become their string values)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def one_gpu_batch_flags(args: SFTConfig, processes: int) -> str | None:
    """The flags that give `processes` data-parallel processes the tokens per optimizer step of one: fewer
    accumulation steps where they divide, else shorter packed rows (a recipe of one 32k row per step); None if neither
    divides evenly."""
    accumulation = args.gradient_accumulation_steps
    if accumulation % processes == 0:
        return f"--gradient_accumulation_steps {accumulation // processes}"
    if args.packing and args.max_length and args.max_length % processes == 0:
        length = args.max_length // processes
        return f"--max_length {length}" + (f" --pad_to_multiple_of {length}" if args.pad_to_multiple_of else "")
    return None
