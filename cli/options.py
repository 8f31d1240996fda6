"""How the CLI's options are made: shared option types, the model and training settings turned into options from
their dataclass fields (`with_settings`), typer's usage and type display made to read as a user types them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

from pipeline.config import recipe_names


class CutInput(Exception):
    """A command's own EOFError (a cut .gz file), carried past click, which takes every EOFError for Ctrl-D and
    prints only "Aborted."."""


class Commands(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EOFError as e:
            raise CutInput(e) from e


def _usage_name(self: TyperArgument) -> str:
    """An argument in a usage line as a user types it: OUT, [WORK] when optional (typer writes {out})."""
    name = (self.metavar or self.name or "").upper()
    return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")


def _flag_type(self: TyperOption, ctx) -> str | None:
    """No type shown for an on/off flag (typer shows <bool>); the metavar or typer's type for the others."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = TyperOption.display_type_rich
# typer has no hook for these two: patched on its classes (setattr: mypy refuses assigning to a method)
setattr(TyperArgument, "_usage_display_name", _usage_name)  # noqa: B010
setattr(TyperOption, "display_type_rich", _flag_type)  # noqa: B010


TrainShards = Annotated[Path, typer.Option("--train", help="Training shard folder.")]
PcaJson = Annotated[Path, typer.Option("--pca", help="pca.json from `alexnet-pipe pca-stats`.")]
RECIPES = "|".join(["paper", *(name for name in recipe_names() if name != "paper"), "FILE"])


def out_folder(positional: Path | None, option: Path | None, what: str) -> Path:
    """The output folder, given as `--out` or (as before) positionally: one of the two."""
    from pipeline.errors import PipeError

    if (positional is None) == (option is None):
        found = "both" if positional is not None else "neither"
        raise PipeError(f"expected the output folder ({what}) once, as --out DIR or as the last argument; found "
                        f"{found}", option="out")
    chosen = positional or option
    assert chosen is not None  # exactly one of the two was given
    return chosen


RunOrCheckpoint = Annotated[Path, typer.Argument(metavar="RUN_OR_CHECKPOINT", help="A run folder (its newest "
                                                 "checkpoint that verifies) or a checkpoint file.")]


Out = Annotated[Path | None, typer.Option("--out", metavar="DIR", help="The output folder (also accepted as the "
                                          "last argument).")]


Workers = Annotated[int | None, typer.Option("--workers", "-j", help="Worker processes (default: all cores). "
                                            "Not part of the cache key.", min=1)]


TaskIndex = Annotated[int | None, typer.Option(help="Array task index (default: $SLURM_ARRAY_TASK_ID). This task "
                                              "writes only units [⌊iU/T⌋, ⌊(i+1)U/T⌋).")]


NumTasks = Annotated[int | None, typer.Option(help="Number of array tasks T; required with --task-index.", min=1)]


Force = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is up to date.")]


Seed = Annotated[int, typer.Option(help="Seed: the same seed gives byte-identical outputs.")]
UntrainedValClasses = Annotated[bool, typer.Option("--untrained-val-classes", help="Accept val shards holding classes "
                                                   "the run never trained on (they count as errors); without it "
                                                   "they are refused.")]


def task_flags(task_index: int | None, num_tasks: int | None) -> tuple[int | None, int | None]:
    """--task-index defaults to $SLURM_ARRAY_TASK_ID; checked before any work starts."""
    from pipeline.engine import task_slice

    if task_index is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        found = os.environ["SLURM_ARRAY_TASK_ID"]
        if not found.isdigit():
            from pipeline.errors import PipeError

            raise PipeError(f"expected SLURM_ARRAY_TASK_ID to be a task index (0, 1, …), found {found!r}",
                            option="task_index")
        task_index = int(found)
    task_slice(0, task_index, num_tasks)
    return task_index, num_tasks


def with_settings(command):
    """Add one option per model and training setting to `command` (which takes them as **settings), built from the
    settings' dataclass fields: the help, allowed values and paper default are the field's, never repeated here. An
    option left out is None, so the recipe's value stands."""
    import inspect
    from dataclasses import fields
    from typing import get_type_hints

    from pipeline.config import SETTINGS, default_of, user_settings

    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    for section, cls in SETTINGS.items():
        hints = get_type_hints(cls)
        panel = f"{'Model' if section == 'model' else 'Training'} settings (the recipe's {section} table)"
        for f in user_settings(cls):
            base = next(t for t in (bool, int, float, str) if hints[f.name] is t or hints[f.name] == t | None)
            choices, dashed = f.metadata["choices"], f.name.replace("_", "-")
            default = default_of(f)
            shown = "" if default is None else f" (paper recipe: {str(default).lower() if base is bool else default})"
            option = typer.Option(f"--{dashed}/--no-{dashed}" if base is bool else f"--{dashed}", *f.metadata["flags"],
                                  help=f.metadata["help"] + shown, rich_help_panel=panel,
                                  min=None if base in (bool, str) else f.metadata["minimum"])
            kind = Literal[choices] if choices else base
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[kind | None, option]))
    command.__signature__ = signature.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    assert {p.name for p in params} >= {f.name for c in SETTINGS.values() for f in fields(c)} - {"num_classes"}
    return command


def numbers(text: str, option: str) -> tuple[float, ...]:
    """A comma-separated list of numbers (`--lrs 0.01,0.03`)."""
    from pipeline.errors import PipeError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PipeError(f"expected numbers separated by commas, got {text!r}", option=option) from None
