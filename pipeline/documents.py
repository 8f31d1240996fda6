"""What a person reads: markdown tables and PNG figures. A figure is drawn with matplotlib's Agg backend and written
atomically through the stage engine (a full disk is one line naming the file, and no half-written PNG is left
under its final name)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.engine import atomic_write


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


@contextlib.contextmanager
def saved_figure(path: Path, figsize: tuple[float, float], dpi: int = 100, **subplots: Any) -> Iterator[Any]:
    """`fig, ax` of a new figure (`subplots` as plt.subplots takes them); laid out, written to `path` and closed
    when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, **subplots)
    try:
        yield fig, ax
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, dpi=dpi, format="png")
        with atomic_write(path) as f:
            f.write(png.getbuffer())
    finally:
        plt.close(fig)
