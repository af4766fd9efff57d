"""User-facing errors: printed by the CLI as one line, exit code 2, never a traceback."""


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
