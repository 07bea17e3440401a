"""The output directory: one run at a time, never clobber a finished adapter, resume interrupted runs, write the
adapter atomically."""

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from gemma_sft import UserError
from gemma_sft.publish import move_files_into

ADAPTER_CONFIG = "adapter_config.json"  # written last: its presence means the adapter is complete
STAGING = ".adapter-staging"


@contextlib.contextmanager
def run_lock(output_dir: str):
    """Hold the output directory for this run: an exclusive lock on `.NAME.lock` beside it (so taking it writes nothing
    into the folder), held until the run ends; a second run on the same folder is refused with the holder's pid."""
    folder = Path(output_dir).absolute()
    path = folder.parent / f".{folder.name}.lock"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise UserError(
                    f"{output_dir}: another run ({holder}) is using this output folder; wait for it to end or "
                    "choose another output_dir"
                ) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # its holder removed it on finishing, after this process opened it: take a fresh one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
    except OSError as exc:
        raise UserError(f"{output_dir}: cannot write there ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a process waiting on this file sees it is gone and takes a new one
        os.close(fd)


def _lock_holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its pid just after taking the lock
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


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


def save_adapter(trainer, output_dir: str, resolved_recipe: dict, note: str = "") -> None:
    """The adapter, tokenizer and resolved recipe (with `note`, e.g. settings changed on resuming, as a comment)."""
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
                "# The recipe this adapter was trained with (recipe file and flags resolved).\n"
                + "".join(f"# {line}\n" for line in note.splitlines())
                + text,
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
