"""Files a stage writes: atomically (a temp name, fsync, rename), appended whole or not at all, under flock; a full
disk or an unwritable place is one line naming the path. Every stage's files go through here."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import PipeError

TMP_TAG = ".tmp-"


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
        if e.errno == errno.ENAMETOOLONG:
            limit = os.pathconf(_existing(path.parent), "PC_NAME_MAX")
            raise PipeError(f"{path}: expected a file name of at most {limit} bytes (this file system's limit), found "
                            f"{len(path.name.encode())}; choose a shorter name") from None
        if e.errno not in _UNWRITABLE:
            raise
        blocker = _existing(path.parent)  # the nearest place that exists: what stands in the way
        found = "a file"
        if blocker.is_dir():
            assert e.strerror is not None  # an OSError with an errno has its message
            found = e.strerror.lower()
        raise PipeError(f"{path}: expected a writable folder at {blocker}, found {found}; choose another output "
                        "path") from None


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def temp_name(path: Path) -> Path:
    """`path`'s temp name in the same folder: `.NAME.tmp-PID`, NAME shortened (a digest of it kept) when the whole
    would pass the file system's limit, so that any name that fits has a temp name that fits."""
    suffix, name = f"{TMP_TAG}{os.getpid()}", path.name
    if len(f".{name}{suffix}".encode()) > 255:  # NAME_MAX of the Linux file systems
        name = name.encode()[:180].decode(errors="ignore") + "~" + hashlib.sha256(path.name.encode()).hexdigest()[:16]
    return path.with_name(f".{name}{suffix}")


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write `path` under a temp name in the same folder; fsync and rename only when the block succeeds."""
    tmp = temp_name(path)
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


def remove_temp_files(folder: Path) -> None:
    """Temp files of writers that were killed (their pid is in the name); call only when no writer can be alive."""
    for tmp in folder.rglob(f".*{TMP_TAG}*"):
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
