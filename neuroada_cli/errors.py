"""User-facing errors: printed by the CLI as one line, exit code 2, never a traceback.

Also the one place that turns the errors of the libraries we read files with (safetensors' SafetensorError,
torch.load's pickle/zip errors, json, yaml, datasets/pyarrow, UnicodeDecodeError, plain OSError) into one line
naming the file: every reader runs inside ``reading(path, what, fix)``, so a format added later cannot slip a
traceback past it. The write side is ``atomic.write_failure`` (every writer goes through atomic.py).
Imports only the standard library: config validation imports this module (the fast CLI face).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Iterator


class UserError(ValueError):
    """A mistake the user can fix; the message names the bad value and the fix, on one line.

    A ValueError, so library users of the method API can catch it as the usual bad-argument error.
    """


class Interrupted(UserError):
    """Ctrl-C during a command: the message says what is left (the last checkpoint, the resume command);
    the CLI exits with 130 as a shell does for SIGINT."""


def one_line(err: BaseException, limit: int | None = 200) -> str:
    """An exception's text squeezed onto one line (whitespace runs become one space), at most ``limit``
    characters (None: no limit); the exception's class name when it has no text."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


# errno -> what the user can do about it (the rest get a generic hint).
_SPACE = "free space (or raise the file-size limit) or write elsewhere"
_ACCESS = "make it writable or write elsewhere"
DISK_HINTS = {errno.ENOSPC: _SPACE, errno.EFBIG: _SPACE, errno.EDQUOT: _SPACE, errno.EROFS: _ACCESS,
              errno.EACCES: _ACCESS, errno.EPERM: _ACCESS}


def os_error_text(cause: OSError) -> str:
    """"No space left on device (ENOSPC); free space ...": the cause and what to do about it."""
    code = errno.errorcode.get(cause.errno, "") if isinstance(cause.errno, int) else ""
    fix = DISK_HINTS.get(cause.errno, "check the path and the disk")
    return f"{cause.strerror or one_line(cause, 160)}{f' ({code})' if code else ''}; {fix}"


def describe(err: BaseException) -> str:
    """What a library's read error says, in a few words: the position for text formats, else class + text."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text: byte 0x{err.object[err.start]:02x} at byte {err.start}"
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
    mark = getattr(err, "problem_mark", None)  # yaml's MarkedYAMLError
    if mark is not None:
        return f"not valid YAML: {one_line(getattr(err, 'problem', None) or err, 80)} at line {mark.line + 1}"
    if isinstance(err, EOFError):
        return "the file ends too early (truncated)"
    name = type(err).__name__
    text = one_line(err, 140)
    return text if text == name else f"{name}: {text}"


def read_failure(path: str | os.PathLike, err: BaseException, what: str = "file",
                 fix: str = "restore it or write it again") -> UserError:
    """The one-line error for ``err`` raised while reading ``path`` (a UserError passes through unchanged)."""
    if isinstance(err, UserError):
        return err
    where = f"{what} {str(path)!r}" if what else repr(str(path))
    if isinstance(err, FileNotFoundError):
        return UserError(f"{where} not found; {fix}")
    if isinstance(err, IsADirectoryError):
        return UserError(f"{where} is a folder, not a file; {fix}")
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EIO):
        return UserError(f"cannot read {where}: {err.strerror or one_line(err)}; check its permissions and the disk")
    return UserError(f"{where} is damaged ({describe(err)}); {fix}")


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "file", fix: str = "restore it or write it again") -> Iterator[None]:
    """Run a read of ``path``: any error it raises (whatever library, whatever type) becomes one UserError line
    naming the file, what is wrong and ``fix``. Keep the block to the read itself, so that a bug in the code
    around it still shows its traceback. MemoryError and Ctrl-C pass through."""
    try:
        yield
    except (UserError, MemoryError):
        raise
    except Exception as err:
        raise read_failure(path, err, what, fix) from None
