"""Atomic writes: a file or a whole directory appears complete or not at all (temp + fsync + rename).

The one home for "never leave half a file": run.json, eval results, checkpoints, adapters, exports and
the converted-model cache all go through ``write_atomic`` or ``atomic_directory``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .errors import UserError

# errno -> what the user can do about it (the rest get a generic hint).
_SPACE = "free space (or raise the file-size limit) or write elsewhere"
_ACCESS = "make it writable or write elsewhere"
_HINTS = {errno.ENOSPC: _SPACE, errno.EFBIG: _SPACE, errno.EDQUOT: _SPACE, errno.EROFS: _ACCESS,
          errno.EACCES: _ACCESS, errno.EPERM: _ACCESS}


def os_error_text(cause: OSError) -> str:
    """"No space left on device (ENOSPC); free space ...": the cause and what to do about it."""
    code = errno.errorcode.get(cause.errno, "") if cause.errno else ""
    fix = _HINTS.get(cause.errno, "check the path and the disk")
    return f"{cause.strerror or cause}{f' ({code})' if code else ''}; {fix}"


def disk_fault(err: BaseException) -> bool:
    """A full disk, a file-size limit, a read-only or forbidden path: faults the CLI reports in one line."""
    return isinstance(err, OSError) and err.errno in _HINTS


class WriteError(UserError):
    """A write that failed and left nothing behind: one line naming the path and the cause."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        self.path, self.cause = Path(path), cause
        super().__init__(f"cannot write {self.path}: {os_error_text(cause)}")


def write_failure(path: str | os.PathLike, err: BaseException) -> BaseException:
    """The error to raise for ``err`` while writing ``path``: OSError becomes a WriteError naming ``path``
    (a WriteError of a nested write is renamed to the outer path, which is what the user asked for)."""
    if isinstance(err, WriteError):
        return WriteError(path, err.cause)
    if isinstance(err, OSError) and not isinstance(err, (FileExistsError, FileNotFoundError)):
        return WriteError(path, err)
    return err


def finite_or_none(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def _fsync_tree(directory: Path) -> None:
    """Flush file contents before a rename makes them visible (survives a power cut)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as err:
        raise write_failure(path, err) from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, value) -> None:
    """JSON that stays valid: non-finite floats are written as null, never as NaN/Infinity."""
    write_atomic(path, json.dumps(finite_or_none(value), indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success it becomes ``target``.

    Whatever the body writes appears at ``target`` in one rename, after an fsync of every file. An
    exception removes the temporary directory and leaves ``target`` as it was. With ``replace`` an
    existing ``target`` is moved aside and deleted only after the new one is in place.
    """
    target = Path(target)
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.mkdir()
    except OSError as err:
        raise write_failure(target, err) from None
    old = None
    try:
        yield temporary
        _fsync_tree(temporary)
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(temporary, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)  # the new one could not take its place: the old one comes back
        failure = write_failure(target, err)
        if failure is err:
            raise
        raise failure from None
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def check_writable_dir(path: str | os.PathLike, key: str) -> None:
    """UserError unless ``path`` is, or can be created as, a writable directory (checked before a model loads,
    so that a bad output path fails in a second rather than after the load or the training)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise UserError(f"{key} {path} {where}; choose a directory path for {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key} {path} is not writable ({existing} is read-only for this user); choose another {key}")
