"""Writing results so that a crash, a full disk or a second writer never leaves a half-written one behind.

Everything is built under a temporary name beside its destination (same file system) and renamed into place. The
temporary names carry the builder's process id, so folders left by a killed builder can be told apart and removed.
"""

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from gemma_sft import UserError

# `.NAME.partial-PID-XXXX`, `.NAME.old-PID-XXXX`, `.NAME.scratch-PID-XXXX`: temporary folders of one builder of NAME
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:partial|old|scratch)-(?P<pid>\d+)-[^.]*$")


def publish_dir(build, target: str | os.PathLike, *, replace: bool = False, lock: bool = False, intact=None) -> Path:
    """`build(folder)` fills a temporary sibling of `target`, which is then renamed to `target`.

    replace: an existing `target` is swapped out only once the new folder is complete (else it is returned as it
    is, for caches). lock: concurrent callers (parallel tests, several ranks) wait and build once. intact: a check of
    an existing `target` (True: reuse it); a damaged one is rebuilt. A `target` that another process published while
    this one was building is left as it is: a one-line UserError. An OSError while writing (disk full, no
    permission) becomes a one-line UserError and removes the temporary folder.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target) if lock else contextlib.nullcontext():
            if target.exists() and not replace and (intact is None or intact(target)):
                return target
            seen = _identity(target)  # the folder this call may replace: none, or the one there now
            staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(target, "partial"), dir=target.parent))
            try:
                os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the result gets the usual mode
                build(staging)
                if _identity(target) != seen:
                    raise UserError(
                        f"{target}: another process wrote it while this one was building; left that one as it is"
                    )
                if target.exists():  # swap: the old folder leaves only after the new one is whole
                    retired = Path(tempfile.mkdtemp(prefix=temporary_prefix(target, "old"), dir=target.parent))
                    os.replace(target, retired / target.name)
                    os.replace(staging, target)
                    shutil.rmtree(retired, ignore_errors=True)
                else:
                    os.rename(staging, target)  # fails, replacing nothing, if a folder appeared there meanwhile
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise UserError(f"{target}: could not write it ({exc.strerror or exc}); nothing was changed there") from None
    return target


def temporary_prefix(target: Path, kind: str) -> str:
    """The name prefix of a temporary folder beside `target` (see remove_stale)."""
    return f".{target.name}.{kind}-{os.getpid()}-"


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporary folders in `folder` that killed builders left behind: those whose process is gone and
    whose destination nobody is building now (its lock is free, which also covers builders on other machines sharing
    the folder). Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            match = _TEMPORARY.match(path.name)
            if not match or _alive(int(match["pid"])):
                continue
            with _locked(folder / match["name"], wait=False) as free:
                if free:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
    return removed


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


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _locked(target: Path, wait: bool = True):
    """The lock of `target`'s builders; yields whether it was taken (always, when waiting)."""
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
