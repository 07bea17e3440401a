"""The output directory: never clobber a finished adapter, resume interrupted runs, write the adapter atomically."""

import json
import os
import shutil
from pathlib import Path

import yaml

from gemma_sft import UserError
from gemma_sft.publish import move_files_into

ADAPTER_CONFIG = "adapter_config.json"  # written last: its presence means the adapter is complete
STAGING = ".adapter-staging"


def check_output_dir(output_dir: str, overwrite: bool) -> str | None:
    """Vet the output directory before any expensive work, creating nothing; returns the checkpoint to resume from."""
    folder = Path(output_dir)
    if (folder / ADAPTER_CONFIG).is_file() and not overwrite:
        raise UserError(
            f"{folder} already holds a finished adapter: choose another output_dir "
            "or pass --overwrite_output_dir true to replace it"
        )
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: output_dir exists and is not a directory")
    existing = next(parent for parent in (folder, *folder.absolute().parents) if parent.exists())
    if not os.access(existing, os.W_OK):
        raise UserError(f"{folder}: cannot write there ({existing} is not writable)")
    if overwrite or not folder.is_dir():
        return None
    return last_complete_checkpoint(folder)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was written to the end; a kill -9 during a save leaves a newer, partial one."""
    steps = sorted(
        (int(path.name.split("-")[1]), path) for path in folder.glob("checkpoint-*") if path.name[11:].isdigit()
    )
    for _, path in reversed(steps):
        if not has_model_weights(path):
            continue
        try:  # the Trainer writes its state last
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return str(path)
    return None


def has_model_weights(checkpoint: Path) -> bool:
    """The adapter (single GPU, DDP) or FSDP's own model state: a sharded folder (its .metadata is written last)
    or a gathered file."""
    from accelerate.utils.constants import FSDP_MODEL_NAME

    fsdp_state = checkpoint / f"{FSDP_MODEL_NAME}_0"  # accelerate's name for the first model's state
    if (checkpoint / "adapter_model.safetensors").is_file() or fsdp_state.with_suffix(".bin").is_file():
        return True
    return (fsdp_state / ".metadata").is_file()


def create_output_dir(output_dir: str, overwrite: bool) -> None:
    """Create the output directory (after the data passed its checks) and prove it takes a write."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"  # one per process: ranks probe at once
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{folder}: cannot write to the output directory ({exc.strerror or exc})") from None
    if overwrite:  # a fresh run: old checkpoints must not be mistaken for this run's
        for old in folder.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)


def save_adapter(trainer, output_dir: str, resolved_recipe: dict) -> None:
    folder = Path(output_dir)
    staging = folder / STAGING
    try:
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        if getattr(trainer, "is_fsdp_enabled", False):  # gather the adapter into one file, not per-rank shards
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(staging))  # collective under FSDP: every rank takes part
        if trainer.is_world_process_zero():
            trainer.processing_class.save_pretrained(str(staging))
            text = yaml.safe_dump(resolved_recipe, allow_unicode=True, sort_keys=False)
            (staging / "recipe.yaml").write_text(
                "# The recipe this adapter was trained with (recipe file and flags resolved).\n" + text,
                encoding="utf-8",
            )
            move_files_into(staging, folder, last=ADAPTER_CONFIG)
    except OSError as exc:
        last = last_complete_checkpoint(folder)
        kept = f"; the last checkpoint is {last}" if last else ""
        raise UserError(f"{folder}: could not write the adapter ({exc.strerror or exc}){kept}") from None


def save_plan(output_dir: str, plan) -> None:
    """What the recipe became on this machine (plan.py), next to the recipe it came from."""
    path = Path(output_dir) / "plan.json"
    path.write_text(json.dumps(plan.as_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
