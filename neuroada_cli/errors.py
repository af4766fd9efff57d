"""User-facing errors: printed by the CLI as one line, exit code 2, never a traceback."""


class UserError(ValueError):
    """A mistake the user can fix; the message names the bad value and the fix, on one line.

    A ValueError, so library users of the method API can catch it as the usual bad-argument error.
    """


class Interrupted(UserError):
    """Ctrl-C during a command: the message says what is left (the last checkpoint, the resume command);
    the CLI exits with 130 as a shell does for SIGINT."""
