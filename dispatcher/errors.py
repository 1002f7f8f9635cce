"""Errors a user can fix, and the exit status each one gives the ``sfn-dispatcher`` command.

Exit statuses (also in ``sfn-dispatcher --help``; `EXIT_STATUSES` is the table the docs'
CLI reference is generated from):

- 0: done (``check``: nothing failed);
- 1: ``check`` found a FAIL line; ``submit``/``redrive``: some entries were refused (listed);
  ``drain --wait``: still running when ``--timeout`` passed;
- 2: usage or configuration error: a bad flag, variable or config file (fix the value named);
- 3: AWS could not be used at start-up: endpoint unreachable, credentials rejected, a state
  machine or queue missing, a permission or the wiring wrong (fix the account, not the flags);
- 4: ``status`` (or ``drain --url``): no dispatcher answers at the status URL;
- 130: interrupted (Ctrl-C).
"""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_AWS = 3
EXIT_NOT_ANSWERING = 4
EXIT_INTERRUPTED = 130

EXIT_STATUSES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "done: `run` shut down in order; `check` found nothing that fails"),
    (
        EXIT_CHECK_FAILED,
        "`check` found at least one FAIL line; `submit` or `redrive`: some entries were "
        "refused (each listed); `drain --wait`: still running when `--timeout` passed",
    ),
    (
        EXIT_USAGE,
        "usage or configuration error: a bad flag, variable or config file; fix the value "
        "named (a supervisor should not retry: the same settings fail again)",
    ),
    (
        EXIT_AWS,
        "AWS could not be used at start-up of `run` (or `sandbox --endpoint` finds no "
        "emulator): endpoint unreachable, credentials refused, a state machine or queue "
        "missing or denied, an EXPRESS machine, nowhere to dead-letter; fix the account or "
        "the network, then `sfn-dispatcher check` says more (a supervisor may retry)",
    ),
    (EXIT_NOT_ANSWERING, "`status` (or `drain --url`): no dispatcher answers at the status URL"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)
"""Every exit status of the ``sfn-dispatcher`` command and what it means."""

EXIT_STATUS_HELP = (
    "exit status: 0 done (check: nothing failed); 1 check found a FAIL line (submit, "
    "redrive: some entries refused; drain --wait: timed out); 2 usage or "
    "configuration error (a bad flag, variable or config file); 3 AWS could not be used at "
    "start-up (endpoint unreachable, credentials rejected, a resource missing, a permission or "
    "the wiring wrong); 4 no dispatcher answers at the status URL; 130 interrupted. See "
    "docs/reference/cli.md."
)


class UserError(Exception):
    """A problem the user can fix (bad setting, unreachable endpoint, port in use, ...).

    The message says what is wrong and how to fix it, one problem per line; the CLI prints
    each line without a traceback (unless ``--debug``) and exits with `exit_code`.
    """

    exit_code = EXIT_USAGE


class AwsSetupError(UserError):
    """AWS cannot be used as configured at start-up: unreachable, refused, missing, denied."""

    exit_code = EXIT_AWS
