"""Atomic writes: a file or a whole directory appears complete or not at all (temp + fsync + rename).

The one home for "never leave half a file": run.json, eval results, checkpoints, adapters, exports and
the converted-model cache all go through ``write_atomic`` or ``atomic_directory``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator

try:
    import resource
except ImportError:  # Windows: no file-size limits
    resource = None

from .errors import DISK_HINTS, UserError, one_line, os_error_text

__all__ = ["WriteError", "atomic_directory", "check_writable_dir", "disk_fault", "finite_or_none", "os_error_text",
           "remove_leftovers", "write_atomic", "write_failure", "write_json"]

# Text of a library's write error that means "the bytes did not reach the disk": torch.save's zip writer
# reports a short write as "unexpected pos" / "PytorchStreamWriter failed writing file".
_WRITER_TEXTS = ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed", "I/O error")
_WRITER_CLASSES = ("SafetensorError",)
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def disk_fault(err: BaseException) -> bool:
    """A full disk, a file-size limit, a read-only or forbidden path: faults the CLI reports in one line."""
    return isinstance(err, OSError) and err.errno in DISK_HINTS


class WriteError(UserError):
    """A write that failed and left nothing behind: one line naming the path and the cause."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        self.path, self.cause = Path(path), cause
        super().__init__(f"cannot write {self.path}: {os_error_text(cause)}")


def _limit_hit(written: Path | None) -> OSError | None:
    """EFBIG when a file under ``written`` reached the file-size limit, ENOSPC when its disk is full, else None:
    what a library that hides the OS error (torch's zip writer) actually ran into."""
    if written is None or not written.exists():
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else -1
    if limit not in (-1, getattr(resource, "RLIM_INFINITY", -1)):
        files = [written] if written.is_file() else [p for p in written.rglob("*") if p.is_file()]
        if any(p.stat().st_size >= limit for p in files):
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    try:
        if shutil.disk_usage(written).free < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        pass
    return None


def library_write_cause(err: BaseException, written: Path | None = None) -> OSError | None:
    """The OSError behind ``err``, raised while writing ``written`` (a file or staging folder), or None when
    ``err`` is not a write failure. OSError is itself; safetensors' SafetensorError and torch.save's RuntimeError
    carry "os error 27" or nothing (then the file-size limit / free space decide); any error raised while a file
    sits at the file-size limit is that limit."""
    if isinstance(err, OSError):
        return err
    if isinstance(err, UserError) or not isinstance(err, Exception):  # Ctrl-C is not a write failure
        return None
    text = str(err)
    found = _ERRNO_IN_TEXT.search(text)
    if found:
        code = int(found.group(1) or found.group(2))
        return OSError(code, os.strerror(code))
    limit = _limit_hit(written)
    if limit is not None:
        return limit
    if type(err).__name__ in _WRITER_CLASSES or (isinstance(err, RuntimeError) and any(t in text for t in _WRITER_TEXTS)):
        return OSError(None, f"{type(err).__name__}: {one_line(err, 140)}")
    return None


def write_failure(path: str | os.PathLike, err: BaseException, written: Path | None = None) -> BaseException:
    """The error to raise for ``err`` while writing ``path`` (``written``: the temporary file or folder): a write
    failure of any library becomes a WriteError naming ``path`` (a WriteError of a nested write is renamed to the
    outer path, which is what the user asked for); anything else is returned unchanged."""
    if isinstance(err, WriteError):
        return WriteError(path, err.cause)
    if isinstance(err, (FileExistsError, FileNotFoundError)):
        return err
    cause = library_write_cause(err, written)
    return WriteError(path, cause) if cause is not None else err


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


# ------------------------------------------------------------------------------ staging names and leftovers
# A staging file or folder is named ".<target>.<tmp|old>-<pid>-<host tag>-<random>": the next writer of the same
# target can tell a leftover of a killed writer (its pid is gone on this host) from a live concurrent one.
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?:(?P<host>[0-9a-f]{6})-)?[0-9a-f]+$")


def staging_path(target: Path, kind: str = "tmp") -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:8]}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # cannot tell: keep its files
    return True


def _dead_staging(parent: Path, name: str | None) -> list[tuple[Path, str, str]]:
    """(path, its target name, tmp|old) of every staging entry in ``parent`` whose writer is dead on this host
    (names of another host, or of a live process, are left alone: their writer may still be running)."""
    found = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for entry in entries:
        match = _STAGING.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if match["host"] not in (None, HOST_TAG) or process_alive(int(match["pid"])):
            continue
        found.append((Path(entry.path), match["name"], match["kind"]))
    return found


def remove_leftovers(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove what killed writers left in ``parent`` (of target ``name``, or of any target): temporary files and
    folders, and the moved-aside old copy of a target; when a writer died between moving the old target aside and
    renaming the new one in, the old copy is put back instead. Returns the paths removed or restored."""
    done = []
    for path, target_name, kind in _dead_staging(Path(parent), name):
        target = path.parent / target_name
        try:
            if kind == "old" and not target.exists():
                os.rename(path, target)  # the interrupted swap: the previous version comes back
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue  # another writer cleaned it first, or it is not ours to remove
        done.append(path)
    return done


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    temporary = staging_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path.parent, path.name)
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
    exception removes the temporary directory and leaves ``target`` as it was; an exception of any library that
    means the write failed (safetensors, torch.save, OSError) becomes one WriteError line naming ``target``. With
    ``replace`` an existing ``target`` is moved aside and deleted only after the new one is in place. Staging
    folders that killed writers of the same target left behind are removed first.
    """
    target = Path(target)
    temporary = staging_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target.parent, target.name)
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
            old = staging_path(target, "old")
            os.rename(target, old)
        os.rename(temporary, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)  # the new one could not take its place: the old one comes back
        failure = write_failure(target, err, temporary)
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
