"""Errors a user can act on. The CLI prints these as one line (no traceback) and exits with `exit_code`."""


class PipeError(Exception):
    """Bad input or a state the user must fix: say what was expected, what was found, and the path."""

    exit_code = 2


class StageBusy(PipeError):
    """Another process holds this stage's run lock."""

    exit_code = 3


class VerifyFailed(PipeError):
    """Shards on disk do not match their manifest."""

    exit_code = 4
