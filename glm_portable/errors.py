"""Errors that reach the user as one message and an exit code, never as a traceback."""


class GlmPortableError(Exception):
    """A failure the CLI reports as its message alone, with ``exit_code``."""

    exit_code = 1


class UserError(GlmPortableError):
    """A mistake the user can fix: bad input, a missing file, an unavailable device (exit code 2)."""

    exit_code = 2


class TrainingStopped(GlmPortableError):
    """Training stopped itself cleanly (a non-finite loss); the message says where and what was kept."""


class NothingToDo(GlmPortableError):
    """The command has nothing left to do (a finished run resumed); the message says why (exit code 0)."""

    exit_code = 0
