"""Errors a user can fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad setting, unreachable endpoint, port in use, ...).

    The message says what is wrong and how to fix it; the CLI prints it on one line
    without a traceback (unless ``--debug``) and exits with status 2.
    """
