"""What keys a stage: its params, hand-bumped VERSION and inputs' digests (`stage_key`); an input's digest is its
upstream product's sha256 or, for a raw source, a fingerprint of names, sizes and mtimes (never a full read of
150 GB). And how two settings differ, said as old → new."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engine.files import canonical_json, sha256_file
from pipeline.errors import PipeError
from pipeline.records.stage import RecordedInput

MARKER = "_stage.json"  # a stage folder's done marker (written last, atomically)


def changed_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted names of the values that differ between two JSON-like values (`train.lr`), sorted."""
    if isinstance(a, dict) and isinstance(b, dict):
        return sorted(d for k in set(a) | set(b) for d in changed_fields(a.get(k), b.get(k), f"{prefix}{k}."))
    return [prefix.rstrip(".")] if a != b else []


def describe_changes(old: Any, new: Any, ignore: tuple[str, ...] = (), shown: int = 4) -> str:
    """What differs between two JSON-like values, old → new: `train.lr 0.003 → 0.01, width 0.5 → 1.0` ("" if
    nothing outside `ignore`); long values (digests) are cut to 16 characters."""
    changed = [d for d in changed_fields(old, new) if d not in ignore]
    said = [f"{k} {_shown(_field(old, k))} → {_shown(_field(new, k))}" for k in changed[:shown]]
    return ", ".join(said) + (f" and {len(changed) - shown} more" if len(changed) > shown else "")


def _field(value: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 18 else text[:16] + "…"


def output_digest(folder: Path) -> str:
    """sha256 over the names and contents of a stage's output files, bookkeeping (`_*`, `.*`) left out: what the
    golden tests pin next to each data stage's VERSION."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(("_", ".")) for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def fingerprint_source(path: Path) -> str:
    """A raw source's digest: names, sizes and mtimes of every file under it (never reads 150 GB of content)."""
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "fp:" + h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root, name)
            st = full.stat() if full.exists() else full.lstat()  # a dangling link: its own entry
            h.update(f"{full.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "fp:" + h.hexdigest()


def stage_key(name: str, version: int, params: dict, inputs: dict[str, str]) -> str:
    blob = canonical_json({"stage": name, "version": version, "params": params, "inputs": inputs})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Input:
    """An input of a stage: its digest (in the key) and where it lives (so `status` can re-check it)."""

    path: Path
    digest: str

    @staticmethod
    def of_stage(folder: Path, product: str) -> Input:
        """A derived input: the digest of an upstream stage's product file (its manifest / pca.json)."""
        f = folder / product
        if not (folder / MARKER).is_file() or not f.is_file():
            raise PipeError(f"{folder}: expected a finished stage holding {product}; run the upstream stage first")
        return Input(folder, "sha256:" + sha256_file(f))

    @staticmethod
    def of_file(path: Path) -> Input:
        """A single derived file (a checkpoint), digested by content."""
        if not path.is_file():
            raise PipeError(f"file not found: {path}")
        return Input(path, "sha256:" + sha256_file(path))

    @staticmethod
    def of_source(path: Path) -> Input:
        if not path.exists():
            raise PipeError(f"input not found: {path}")
        return Input(path, fingerprint_source(path))


def recorded_input(inp: Input, out: Path) -> RecordedInput:
    """How a done marker keeps an input: its digest and its path three ways, as typed, relative to the stage
    folder and absolute (see `recorded_input_path`)."""
    absolute = os.path.abspath(inp.path)
    return RecordedInput(str(inp.path), inp.digest, os.path.relpath(absolute, os.path.abspath(out)), absolute)


def recorded_input_path(folder: Path, inp: RecordedInput) -> Path:
    """Where a recorded input is now, from any working folder: relative to the stage folder first (a WORK moved
    or copied as a whole stays done), then the absolute path, then the path as typed (markers written before the
    other two were kept). The first that exists; the first tried when none does."""
    tried = [folder / inp.from_stage] if inp.from_stage is not None else []
    tried += [Path(p) for p in (inp.absolute, inp.path) if p is not None]
    return next((p for p in tried if p.exists()), tried[0])
