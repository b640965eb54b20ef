"""Errors that reach the user as one message and exit code 2, never as a traceback."""


class UserError(Exception):
    """A mistake the user can fix: bad input, a missing file, an unavailable device.

    The CLI prints the message alone and exits with code 2; anything else is an internal error.
    """

    exit_code = 2
