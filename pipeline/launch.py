"""`alexnet-pipe-torchrun`: torchrun, taking the same arguments, as the Slurm train job starts it.

A stop signal (SIGTERM from the job's USR1 trap, a cancel, Ctrl-C) makes torchrun pass the signal on to its ranks,
wait for them (they checkpoint and exit 0), then raise `SignalException`, which it prints as a traceback. Here that
ending is one line saying what happened, with the shell's exit status for a signal (128 + its number).
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as stopped:
        name = signal.Signals(stopped.sigval).name
        print(f"torchrun: stopped by {name}; the ranks were passed the signal and have exited", file=sys.stderr)
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
