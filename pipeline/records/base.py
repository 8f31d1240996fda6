"""Records: frozen dataclasses read from and written to JSON. Each has a `FORMAT` number, one `from_json` that
reads every format ever written (the migrations live in its `migrate` and nowhere else) and one `to_json`, the only
writer.

Format 1 is what the first version wrote, and a file without a `format` field is format 1, so that no byte of an
existing output changes (manifests and pca.json key the stages downstream). No torch, no numpy: `status`, `report`
and an up-to-date stage read these without them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pipeline.errors import PipeError

R = TypeVar("R", bound="Record")


def absent_when_none(default: Any = None) -> Any:
    """A field that is left out of the file when None (an optional part: ten_crop, figure4, lr_drop, …)."""
    return field(default=default, metadata={"absent_when_none": True})


class Record:
    """A frozen dataclass read from and written to JSON. Subclasses set `FORMAT` and, when it grew, `migrate`."""

    FORMAT: ClassVar[int] = 1

    @classmethod
    def migrate(cls, data: dict, format: int) -> dict:
        """`data` as written in `format` (< FORMAT), rewritten in this format's shape (keys, not types)."""
        return data

    @classmethod
    def from_json(cls: type[R], data: dict) -> R:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, found {type(data).__name__}")
        written = data.get("format", 1)
        if not isinstance(written, int) or written > cls.FORMAT:
            raise ValueError(f"{cls.__name__}: format {written!r} is newer than this version reads ({cls.FORMAT})")
        body = {k: v for k, v in data.items() if k != "format"}
        return build(cls, cls.migrate(body, written) if written < cls.FORMAT else body)

    def to_json(self) -> dict:
        plain = to_plain(self)
        return {"format": self.FORMAT, **plain} if self.FORMAT > 1 else plain

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        """The record in the JSON file `path`; a file that is not one is a one-line error naming it."""
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise PipeError(f"{path}: no such file") from None
        except (ValueError, TypeError, KeyError) as e:
            raise PipeError(f"{path}: expected {cls.__name__} JSON, found {type(e).__name__}: {e}") from None


def to_plain(value: Any) -> Any:
    """Dataclasses → dicts (fields marked absent_when_none left out when None), tuples → lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get("absent_when_none"):
                continue
            out[f.name] = to_plain(item)
        return out
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def build(kind: Any, value: Any) -> Any:
    """`value` (parsed JSON) as an instance of the type `kind`: dataclasses from dicts (an unknown key is an
    error), tuples from lists, ints where floats are expected as floats; anything untyped as it is."""
    if value is None or kind is Any:
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        return build(next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        item = args[0] if args else Any
        return tuple(build(item, v) for v in value)
    if origin is dict:
        return {k: build(args[1], v) for k, v in value.items()} if args else dict(value)
    if origin is list:
        return [build(args[0], v) for v in value] if args else list(value)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ValueError(f"{kind.__name__}: expected an object, found {value!r}")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in fields(kind)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{kind.__name__}: unknown field(s) {', '.join(unknown)}")
        missing = [f.name for f in fields(kind) if f.name not in value and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{kind.__name__}: missing field(s) {', '.join(missing)}")
        return kind(**{k: build(hints[k], v) for k, v in value.items()})
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
