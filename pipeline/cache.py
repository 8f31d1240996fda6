"""The stage engine: cache keys, done markers, atomic writes, locks. The only place that knows about caching.

A stage's key hashes its params, its hand-bumped `VERSION` and its inputs' digests. Its folder holds
  _stage.json        the done marker (written last, atomically): key, params, inputs, timings
  _plan.json         the key and unit list of the run in progress, so `status` can say "partial k of n"
  _units/<u>.json    one record per finished unit, written after the unit's own files were renamed into place
  .locks/            flock files: `run` (one full run at a time), `finalize`, and one per unit
A unit writes its files under temp names and renames them when complete, so a SIGKILL loses only the units in
flight and never leaves a truncated file under a final name. `--workers` and the task flags are not in the key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.errors import PipeError, StageBusy

MARKER = "_stage.json"
PLAN = "_plan.json"
UNITS = "_units"
LOCKS = ".locks"
TMP_TAG = ".tmp-"


# ---------------------------------------------------------------------------------------------------------------
# atomic files


@contextlib.contextmanager
def disk_full_is_user_error(path: Path) -> Iterator[None]:
    """A full disk (or quota) while writing `path` is the user's to fix: one line naming the path, exit 2. Every
    stage's files go through here (atomic_write, the locks, synth's folder), so it is handled once."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise PipeError(f"{path}: no space left on the device while writing it ({e.strerror}); free space there "
                        "or choose another output folder, then rerun: finished units are kept") from None


# An output path the user chose that cannot be made or written (a file where a folder must be, no such place,
# read-only, no permission): theirs to fix, unlike such an error later inside a writer's own block.
_UNWRITABLE = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def unwritable_is_user_error(path: Path) -> Iterator[None]:
    """Around making `path`'s folder and creating `path` (or its temp file): a place that cannot be written is one
    line naming it, exit 2. Used where files and folders are created (atomic_write, the locks, stage folders)."""
    try:
        yield
    except OSError as e:
        if e.errno not in _UNWRITABLE:
            raise
        blocker = path.parent  # the nearest place that exists: what stands in the way
        while not blocker.exists() and blocker != blocker.parent:
            blocker = blocker.parent
        found = "a file"
        if blocker.is_dir():
            assert e.strerror is not None  # an OSError with an errno has its message
            found = e.strerror.lower()
        raise PipeError(f"{path}: expected a writable folder at {blocker}, found {found}; choose another output "
                        "path") from None


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write `path` under a temp name in the same folder; fsync and rename only when the block succeeds."""
    tmp = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")
    with disk_full_is_user_error(path):
        with unwritable_is_user_error(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, mode)
        try:
            with f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def append_line(path: Path, line: str) -> None:
    """Append `line` and a newline to a log (metrics.jsonl, events.jsonl) as one write, fsync'd. A write that fails
    part-way (a full disk) is cut back off, so a log never holds half a line; the error names the file."""
    data = (line + "\n").encode()
    with disk_full_is_user_error(path):
        with unwritable_is_user_error(path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, f"wrote {written} of {len(data)} bytes")
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        f.write(canonical_json(obj))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipeError(f"{path}: not valid JSON ({e})") from None


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


def remove_temp_files(folder: Path) -> None:
    """Temp files of writers that were killed (their pid is in the name); call only when no writer can be alive."""
    for tmp in folder.rglob(f".*{TMP_TAG}*"):
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# digests


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


# ---------------------------------------------------------------------------------------------------------------
# locks


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool) -> Iterator[bool]:
    """flock on `path`; yields whether it was acquired. The kernel drops it when the holder dies (SIGKILL too)."""
    with disk_full_is_user_error(path), unwritable_is_user_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):  # the holder's name is a courtesy: a full disk must not cost the lock
            os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# stages


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


@dataclass
class Stage:
    """One run of a stage over one output folder."""

    name: str
    version: int
    out: Path
    params: dict
    inputs: dict[str, Input] = field(default_factory=dict)
    product: str | None = None  # the file downstream stages digest (manifest.json, pca.json, …)
    outputs: tuple[str, ...] = ()  # globs of this stage's files, removed when the key changes
    # earlier VERSIONs whose finished units this one still uses (only the product changed): kept across the bump
    unit_versions: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return self._key(self.version)

    def _key(self, version: int) -> str:
        return stage_key(self.name, version, self.params, {k: v.digest for k, v in self.inputs.items()})

    def marker(self) -> dict | None:
        """The done marker; None when there is none or it was cut short (then the stage is redone)."""
        p = self.out / MARKER
        try:
            return read_json(p) if p.is_file() else None
        except PipeError:
            return None

    def up_to_date(self) -> bool:
        m = self.marker()
        return m is not None and m.get("key") == self.key

    def stale_reason(self) -> str | None:
        """Why a finished stage no longer matches this configuration, with the old and new values (None if it
        matches or never finished)."""
        if (self.out / MARKER).is_file() and self.marker() is None:
            return f"its {MARKER} is damaged (not valid JSON)"
        m = self.marker()
        if m is None or m.get("key") == self.key:
            return None
        if m.get("version") != self.version:
            return f"stage version {m.get('version')} → {self.version}"
        changed = [k for k, v in self.inputs.items() if m.get("inputs", {}).get(k, {}).get("digest") != v.digest]
        if changed:
            return "input changed: " + ", ".join(changed)
        diff = describe_changes(m.get("params", {}), self.params)
        return f"params changed: {diff}" if diff else "key changed"

    # -- running ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def run_lock(self, exclusive: bool, splittable: bool = False) -> Iterator[None]:
        """A full run (no task flags) holds the run lock throughout; array tasks share the folder without it.
        `splittable`: the stage takes --task-index/--num-tasks (the message then says so)."""
        if not exclusive:
            yield
            return
        lock = self.out / LOCKS / "run"
        with file_lock(lock, blocking=False) as got:
            if not got:
                holder = lock.read_text().strip() if lock.exists() else "another process"
                raise StageBusy(f"stage {self.name} is already running in {self.out} ({holder}); wait for it"
                                + (", or split the work with --task-index/--num-tasks" if splittable else ""))
            yield

    def plan(self, units: list[str], force: bool = False) -> None:
        """Record the unit list for this key; a different key (or --force) first removes the old outputs, unless
        it is this stage's key under one of `unit_versions` (then its units are kept, its done marker goes). Units
        only accumulate under one key: a stage that learns its units from a first unit plans twice."""
        with unwritable_is_user_error(self.out / PLAN):
            self.out.mkdir(parents=True, exist_ok=True)
        with file_lock(self.out / LOCKS / "finalize", blocking=True):
            p = self.out / PLAN
            old = read_json(p) if p.is_file() else None
            marker = self.marker()
            old_key = (old or {}).get("key") or (marker or {}).get("key")
            reusable = {self.key, *(self._key(v) for v in self.unit_versions)}
            if force or (old_key is not None and old_key not in reusable):
                self.clear()
                old = None
            elif old_key is not None and old_key != self.key:
                (self.out / MARKER).unlink(missing_ok=True)  # an earlier version's product: not done any more
            known = list((old or {}).get("units", [])) if (old or {}).get("key") in reusable else []
            merged = known + [u for u in units if u not in known]
            if old is None or merged != known or old.get("key") != self.key:
                write_json(p, {"stage": self.name, "key": self.key, "units": merged})

    def reopen(self, units: Iterable[str]) -> None:
        """Finished units whose files were found damaged become to-do again: their records and the done marker
        go, everything else is kept (the rerun rewrites exactly those units, then finalizes)."""
        with file_lock(self.out / LOCKS / "finalize", blocking=True):
            (self.out / MARKER).unlink(missing_ok=True)
            for unit in units:
                self.unit_record_path(unit).unlink(missing_ok=True)

    def clear(self) -> None:
        (self.out / MARKER).unlink(missing_ok=True)
        for pattern in (*self.outputs, f"{UNITS}/*.json", PLAN):
            for f in self.out.glob(pattern):
                f.unlink()
        remove_temp_files(self.out)

    def unit_record_path(self, unit: str) -> Path:
        return self.out / UNITS / f"{unit}.json"

    def unit_done(self, unit: str) -> bool:
        return self.unit_record_path(unit).is_file()

    def records(self, units: Iterable[str]) -> dict[str, dict]:
        return {u: read_json(self.unit_record_path(u)) for u in units}

    def run_units(self, units: list[str], work: Callable[[str], dict], *, workers: int = 1,
                  on_done: Callable[[str, dict], None] | None = None, wait_for_others: bool = True) -> None:
        """Run every unit of `units` that is not done yet. `work(unit)` writes the unit's files atomically and
        returns its record (picklable; a top-level function when workers > 1). A unit locked by another process is
        left to it; with `wait_for_others`, this run then waits for those units to appear."""
        todo = [u for u in units if not self.unit_done(u)]
        job = _UnitJob(str(self.out), work)
        if workers > 1 and len(todo) > 1:
            import multiprocessing

            ctx = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_start_worker,
                                     initargs=(os.getpid(), job)) as pool:
                results = list(_report(pool.map(_run_in_worker, todo), on_done))
        else:
            results = list(_report(map(job, todo), on_done))
        held = [u for u, rec in results if rec is None]
        if held and wait_for_others:
            for u in held:
                with file_lock(self.out / LOCKS / f"unit-{u}", blocking=True):
                    pass
                if not self.unit_done(u):  # its holder died: do it ourselves
                    list(_report(map(job, [u]), on_done))

    def finalize(self, write_products: Callable[[], object], *, started: float, extra: dict | None = None) -> bool:
        """Under the finalize lock: write the products, then the done marker last. False if already done."""
        with file_lock(self.out / LOCKS / "finalize", blocking=True):
            if self.up_to_date():
                return False
            write_products()
            remove_temp_files(self.out)
            write_json(self.out / MARKER, {
                "stage": self.name,
                "key": self.key,
                "version": self.version,
                "params": self.params,
                "inputs": {k: recorded_input(v, self.out) for k, v in self.inputs.items()},
                "product": self.product,
                "seconds": round(time.time() - started, 3),
                **(extra or {}),
            })
            return True


@dataclass(frozen=True)
class _UnitJob:
    """Runs one unit under its lock and writes its record; picklable so worker processes can run it."""

    out: str
    work: Callable[[str], dict]

    def __call__(self, unit: str) -> tuple[str, dict | None]:
        out = Path(self.out)
        record_path = out / UNITS / f"{unit}.json"
        with file_lock(out / LOCKS / f"unit-{unit}", blocking=False) as got:
            if not got:
                return unit, None
            if record_path.is_file():  # finished by another process between our check and our lock
                return unit, read_json(record_path)
            record = self.work(unit)
            write_json(record_path, record)
            return unit, record


_worker_job: _UnitJob | None = None  # set once in each worker process by _start_worker


def _start_worker(parent: int, job: _UnitJob) -> None:
    """A worker gets the job once, here, and each task only its unit's name: `pool.map(job, …)` would pickle the
    job with every task, and a job that holds something for each unit (pca-stats' sample positions per shard)
    then costs units² to send."""
    global _worker_job
    _worker_job = job
    _exit_with_parent(parent)


def _run_in_worker(unit: str) -> tuple[str, dict | None]:
    assert _worker_job is not None  # the pool's initializer sets it
    return _worker_job(unit)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was SIGKILLed would wait on its task queue forever: poll the parent and leave."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _report(results: Iterable[tuple[str, dict | None]], on_done) -> Iterator[tuple[str, dict | None]]:
    for unit, rec in results:
        if rec is not None and on_done is not None:
            on_done(unit, rec)
        yield unit, rec


# ---------------------------------------------------------------------------------------------------------------
# status


@dataclass(frozen=True)
class StageState:
    state: str  # done | stale | partial | missing
    detail: str = ""


def inspect(folder: Path) -> StageState:
    """What a stage folder holds, re-checking recorded input digests (used by `alexnet-pipe status`)."""
    marker_path, plan_path = folder / MARKER, folder / PLAN
    if marker_path.is_file():
        marker = read_json(marker_path)
        for name, inp in marker.get("inputs", {}).items():
            path = recorded_input_path(folder, inp)
            if not path.exists():
                return StageState("stale", f"input {name} missing: {path}")
            if inp["digest"].startswith("fp:"):
                digest = fingerprint_source(path)
            elif path.is_file():
                digest = "sha256:" + sha256_file(path)
            elif (path / MARKER).is_file():
                digest = "sha256:" + sha256_file(path / _product_of(path))
            else:
                return StageState("stale", f"input {name} is no longer a finished stage: {path}")
            if digest != inp["digest"]:
                return StageState("stale", f"input {name} changed ({path})")
        return StageState("done", f"key {marker['key']}, {marker.get('seconds', 0):.1f} s")
    if plan_path.is_file():
        units = read_json(plan_path)["units"]
        done = sum((folder / UNITS / f"{u}.json").is_file() for u in units)
        return StageState("partial", f"{done} of {len(units)} units")
    return StageState("missing")


def recorded_input(inp: Input, out: Path) -> dict:
    """How a done marker keeps an input: its digest and its path three ways, as typed, relative to the stage
    folder and absolute (see `recorded_input_path`)."""
    absolute = os.path.abspath(inp.path)
    return {"path": str(inp.path), "from_stage": os.path.relpath(absolute, os.path.abspath(out)),
            "absolute": absolute, "digest": inp.digest}


def recorded_input_path(folder: Path, inp: dict) -> Path:
    """Where a recorded input is now, from any working folder: relative to the stage folder first (a WORK moved
    or copied as a whole stays done), then the absolute path, then the path as typed (markers written before the
    other two were kept). The first that exists; the first tried when none does."""
    tried = [folder / inp["from_stage"]] if "from_stage" in inp else []
    tried += [Path(inp[k]) for k in ("absolute", "path") if k in inp]
    return next((p for p in tried if p.exists()), tried[0])


def stage_input_path(folder: Path, name: str) -> Path | None:
    """Where input `name` of the finished stage in `folder` is now (`recorded_input_path`); None if not recorded."""
    marker = read_json(folder / MARKER) if (folder / MARKER).is_file() else {}
    recorded = marker.get("inputs", {}).get(name)
    return recorded_input_path(folder, recorded) if recorded else None


def _product_of(folder: Path) -> str:
    marker = read_json(folder / MARKER) if (folder / MARKER).is_file() else {}
    product = marker.get("product")
    if not product:
        raise PipeError(f"{folder}: no finished stage with a product file")
    return product
