"""One run per run directory: ``<output_dir>/.neuroada.lock``, created atomically (O_CREAT | O_EXCL).

Two runs on one ``trainer.output_dir`` (a scheduler retry, a second terminal) would race: one deletes the
other's checkpoint staging folder, and ``train_log.jsonl`` loses steps when both truncate and append it. So
process 0 of every run (fresh or resumed) creates the lock before it reads or writes anything there, and a
second run refuses in one line naming the holder (pid, host, start, command). The lock records the holder's
pid, host and process start time: a lock whose process is gone on this host (a killed run, a reboot, a reused
pid) is stale and taken over; a lock of another host cannot be checked from here, so the message says how to
remove it by hand. Under several processes only process 0 takes the lock and every process learns the
outcome (``share``), so all refuse together.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..atomic import process_alive
from ..errors import UserError, one_line

LOCK_NAME = ".neuroada.lock"
TAKEOVER_SUFFIX = ".takeover"
TORN_AFTER_S = 10.0  # an empty or garbled lock this old was left by a writer killed while creating it
TAKEOVER_STALE_S = 30.0


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the holder."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat; fields[0] is field 3
    except (OSError, IndexError):
        return None


class RunLock:
    """A held run-directory lock; ``release()`` removes it (and the directories created for it, when empty)."""

    def __init__(self, path: Path, token: str, created: list[Path]):
        self.path, self.token, self.created = path, token, created

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.token:  # never someone else's lock
                self.path.unlink()
        for folder in reversed(self.created):  # a fresh run that failed before writing leaves no empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.created = []


def _record(token: str) -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "proc_start": _process_start(pid), "token": token,
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": one_line(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), 160)}


def _read(path: Path) -> dict | None:
    """The lock's record; None when it is empty or garbled (a holder killed while writing it)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def holder_is_gone(record: dict | None, path: Path) -> bool:
    """Whether the lock ``record`` at ``path`` is stale: its process is gone on this host (or it is a pid reused
    by another process), or the record is torn and old. A lock of another host is never stale from here."""
    if record is None:
        try:
            return time.time() - path.stat().st_mtime > TORN_AFTER_S
        except FileNotFoundError:
            return True
    if record.get("host") != socket.gethostname():
        return False
    pid = record["pid"]
    if not process_alive(pid):
        return True
    started = record.get("proc_start")
    return started is not None and _process_start(pid) not in (None, started)


def _create(path: Path, record: dict) -> bool:
    """Create the lock holding ``record``; False when it exists already."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _take_over(path: Path, stale: dict | None, record: dict) -> bool:
    """Replace the stale lock with ours; one process at a time (a second O_EXCL file), so that two runs finding
    the same stale lock cannot both take it."""
    guard = path.with_name(path.name + TAKEOVER_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
            guard.unlink()  # a taker killed mid-takeover
    if not _create(guard, record):
        return False
    try:
        if _read(path) != stale:  # someone else took it over in between
            return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return _create(path, record)
    finally:
        with contextlib.suppress(OSError):
            guard.unlink()


def _held_message(output_dir: Path, path: Path, holder: dict | None) -> str:
    if holder is None:
        who = "a run whose lock is being written"
    else:
        who = (f"another run (pid {holder['pid']} on {holder.get('host')}, started {holder.get('started')}: "
               f"{holder.get('command')})")
    return (f"trainer.output_dir {str(output_dir)!r} is in use by {who}; wait for it to finish or choose another "
            f"trainer.output_dir (if that run is gone, delete {path})")


def acquire(output_dir: str | os.PathLike, attempts: int = 20) -> RunLock:
    """Take ``<output_dir>/.neuroada.lock`` (creating the folder); UserError naming the holder when it is held."""
    output_dir = Path(output_dir)
    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()][::-1]
    from ..atomic import write_failure

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failure(output_dir, err) from None
    path = output_dir / LOCK_NAME
    token = uuid.uuid4().hex
    record = _record(token)
    holder = None
    for _ in range(attempts):
        try:
            if _create(path, record):
                return RunLock(path, token, created)
            holder = _read(path)
            if holder_is_gone(holder, path) and _take_over(path, holder, record):
                return RunLock(path, token, created)
        except OSError as err:
            RunLock(path, token, created).release()
            raise write_failure(path, err) from None
        if holder is not None and not holder_is_gone(holder, path):
            break  # a live holder: no point in waiting
        time.sleep(0.1)  # a lock being written, or a takeover by another process: look again
    RunLock(path, "", created).release()
    raise UserError(_held_message(output_dir, path, holder))


def lock_run_directory(output_dir: Path, is_main: bool, share: Callable[[object], object] | None = None
                       ) -> RunLock | None:
    """Every process calls this: process 0 takes the lock, ``share`` (a broadcast from process 0; None with one
    process) tells the others whether it got it, and all raise the same one-line error when not.
    Returns the lock on process 0, None elsewhere."""
    lock, refusal = None, None
    if is_main:
        try:
            lock = acquire(output_dir)
        except UserError as err:
            refusal = str(err)
    if share is not None:
        refusal = share(refusal)
    if refusal is not None:
        raise UserError(refusal)
    return lock
