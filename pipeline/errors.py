"""Errors a user can act on. The CLI prints these as one line (no traceback) and exits with `exit_code`."""


class PipeError(Exception):
    """Bad input or a state the user must fix: say what was expected, what was found, and the path. `option`: the
    setting or argument at fault by its name (`batch_size`, `devices`); the CLI shows it as the flag."""

    exit_code = 2

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class StageBusy(PipeError):
    """Another process holds this stage's run lock."""

    exit_code = 3


class VerifyFailed(PipeError):
    """Shards on disk do not match their manifest."""

    exit_code = 4


class PeerLost(PipeError):
    """Another rank of a multi-rank run died (killed, its node lost): this rank stops too. Nothing is lost: the run
    resumes from its newest checkpoint, on any number of ranks."""

    exit_code = 6


class Diverged(Exception):
    """A training loss that was not finite ended the run at `step` (its last finite checkpoint kept): exit 5."""

    exit_code = 5

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class Stopped(Exception):
    """A stop signal ended the work at a checkpoint: not an error, a rerun resumes. The CLI prints the message and
    exits 0 for SIGTERM/SIGUSR1 (Slurm's preemption and time-limit warnings: the job's own script decides what
    follows) and 130 for Ctrl-C (SIGINT), so that `train && eval` in a shell stops there too."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 130 if self.signal_name == "SIGINT" else 0
