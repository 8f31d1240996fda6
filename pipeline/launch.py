"""`alexnet-pipe-torchrun`: torchrun, taking the same arguments, as the Slurm train job starts it.

Two endings torchrun prints as a traceback are one line here, with an exit status a script can read:
- a stop signal (SIGTERM from the job's USR1 trap, a cancel, Ctrl-C): torchrun passes it on to its ranks, waits for
  them (they checkpoint and exit 0) and raises `SignalException`; here the shell's status for it, 128 + its number;
- a rank that died (SIGKILL, the OOM killer, a crash): torchrun stops the others and raises `ChildFailedError`;
  here which rank died and how, where the run resumes (the newest checkpoint of its --out), and exit 6, as the
  surviving ranks' own `train` exits.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

PEER_LOST = 6  # pipeline.errors.PeerLost.exit_code (not imported: this runs before torch is set up)


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as stopped:
        name = signal.Signals(stopped.sigval).name
        print(f"torchrun: stopped by {name}; the ranks were passed the signal and have exited", file=sys.stderr)
        return 128 + int(stopped.sigval)
    except ChildFailedError as failed:
        logging.shutdown()
        print(f"torchrun: {died(failed)}; the other ranks stopped. {resume_from(sys.argv[1:])}", file=sys.stderr)
        return PEER_LOST
    return 0


def died(failed) -> str:
    """Which ranks died, and of what (a signal's name, or an exit status)."""
    failures = sorted(failed.failures.items())
    # not the ranks that only lost it: those that stopped with PeerLost, or that torchrun itself sent SIGTERM
    dead = [(rank, f) for rank, f in failures if f.exitcode not in (PEER_LOST, -signal.SIGTERM)] or failures
    return ", ".join(f"rank {rank} died ("
                     + (f"killed by {f.signal_name()}" if f.exitcode < 0 else f"exit {f.exitcode}") + ")"
                     for rank, f in dead)


def resume_from(args: list[str]) -> str:
    """Where the run goes on from: the newest checkpoint in the train command's --out."""
    from pipeline.train.checkpoints import latest_checkpoint

    out = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--out"), None)
    newest = latest_checkpoint(Path(out) / "checkpoints") if out else None
    where = f"from {newest}" if newest else "from its newest checkpoint" if out is None else "from the start"
    return f"Nothing is lost: rerun the same command to resume {where}."


if __name__ == "__main__":
    sys.exit(main())
