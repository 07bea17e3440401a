"""Writing results so that a crash, a full disk or a second writer never leaves a half-written one behind.

Everything is built under a temporary name beside its destination (same file system) and renamed into place.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from gemma_sft import UserError


def publish_dir(build, target: str | os.PathLike, *, replace: bool = False, lock: bool = False) -> Path:
    """`build(folder)` fills a temporary sibling of `target`, which is then renamed to `target`.

    replace: an existing `target` is swapped out only once the new folder is complete (else it is returned as it
    is, for caches). lock: concurrent callers (parallel tests, several ranks) wait and build once. An OSError while
    writing (disk full, no permission) becomes a one-line UserError and removes the temporary folder.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target) if lock else contextlib.nullcontext():
            if target.exists() and not replace:
                return target
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
            try:
                os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the result gets the usual mode
                build(staging)
                if target.exists():  # swap: the old folder leaves only after the new one is whole
                    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                    os.replace(target, retired / target.name)
                    os.replace(staging, target)
                    shutil.rmtree(retired, ignore_errors=True)
                else:
                    os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise UserError(f"{target}: could not write it ({exc.strerror or exc}); nothing was changed there") from None
    return target


def move_files_into(staging: Path, folder: Path, last: str) -> None:
    """Move every file of `staging` into the existing `folder`, replacing same-named ones. `last` (the file that
    marks the result complete, e.g. adapter_config.json) is removed first and moved in last, so a crash part-way
    leaves no complete-looking mixture of old and new files."""
    (folder / last).unlink(missing_ok=True)
    for name in sorted((p.name for p in staging.iterdir()), key=lambda name: name == last):
        destination = folder / name
        if destination.is_dir():
            shutil.rmtree(destination)
        os.replace(staging / name, destination)
    staging.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _locked(target: Path):
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
