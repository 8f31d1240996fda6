"""The settings of the model and of training, each declared once: a dataclass field whose default is the paper's
value, with its help text, allowed values and role in `field(metadata=…)`. The CLI's train options and the recipe
keys (`pipeline/recipes/*.toml`) are built from these fields; nothing else repeats a default.

No torch here: the train stage decides it is up to date (its cache key is built from these) without importing it.
"""

from __future__ import annotations

import math
import tomllib
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path

from pipeline.errors import PipeError

# An 11x11 stride-4 conv gives the paper's 55x55 from 224 with padding 2 (torchvision) or from 227 unpadded (Caffe).
CAFFE_CROP = 227  # the one crop conv1 reads unpadded; every other crop is padded by 2, as torchvision pads 224
SMALLEST_CROP = 63  # the smallest crop whose pool5 maps are not empty (conv1 15, pools 7, 3, 1)
LRN_CONVENTIONS = ("paper", "caffe")
INITS = ("paper", "default")
ACTIVATIONS = ("relu", "tanh")  # §3.1
NORMS = ("lrn", "none", "batch")  # §3.3 (batch: not in the paper)
POOLS = ("overlap", "plain")  # §3.4
TOWERS = (2, 1)  # §3.2
Loader = typing.Literal["dali", "torch"]
LOADERS: tuple[Loader, ...] = typing.get_args(Loader)  # DALI, or the plain torch reference path
LR_SCHEDULES = ("plateau", "step")

# What a setting is to a run (metadata "role"):
SettingValue = bool | int | float | str | None  # what a setting holds (a recipe's TOML value, a flag's)
RESULT = "result"    # changes the weights: a run's checkpoints are resumed only with the same value
EXTENT = "extent"    # how long to train (epochs, max_steps): part of the cache key, may grow on resume
RUNTIME = "runtime"  # does not change results (logging, checkpoint cadence, threads): never compared
DATA = "data"        # comes from the shards (num_classes), not from a recipe or the command line


def conv1_padding(crop: int) -> int:
    return 0 if crop == CAFFE_CROP else 2


def map_sides(crop: int, pool: str) -> dict[str, int]:
    """The side of each layer's output maps for a `crop`-pixel input (§3.5: 55, 27, 13, 6 at 224). conv2–conv5 keep
    their input's size; each pool (overlap z=3, plain z=2, both s=2) roughly halves it."""
    z = 3 if pool == "overlap" else 2
    conv1 = (crop + 2 * conv1_padding(crop) - 11) // 4 + 1
    pool1 = (conv1 - z) // 2 + 1
    pool2 = (pool1 - z) // 2 + 1
    return {"conv1": conv1, "pool1": pool1, "conv2": pool1, "pool2": pool2, "conv3-5": pool2,
            "pool5": (pool2 - z) // 2 + 1}


def setting(default, help: str, *, choices: tuple | None = None, minimum: float | None = None, role: str = RESULT,
            flags: tuple[str, ...] = ()):
    """A field with the one definition of its default, help text, allowed values and role; `flags` are extra
    command-line spellings (the dashed field name is always one)."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum, "role": role,
                                            "flags": flags})


class SettingError(ValueError):
    """A value a setting does not allow; `name` is the setting."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class _Settings:
    """Shared behaviour of the two settings dataclasses: checks from the field metadata, plain JSON types."""

    if typing.TYPE_CHECKING:  # what @dataclass gives each subclass
        __dataclass_fields__: typing.ClassVar[dict[str, Field[typing.Any]]]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if hints[f.name] is float or hints[f.name] == float | None:
                value = float(value)  # stable JSON: the checkpoint stores this dict and the stage hashes it (1 vs 1.0)
                if not math.isfinite(value):
                    raise SettingError(f.name, f"{f.name} must be a finite number, got {value!r}")
            elif hints[f.name] is int or hints[f.name] == int | None:
                value = int(value)
            setattr(self, f.name, value)
            choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
            if choices and value not in choices:
                raise SettingError(f.name, f"{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}")
            if minimum is not None and value < minimum:
                raise SettingError(f.name, f"{f.name} must be >= {minimum}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """From a stored dict (a checkpoint's config): keys written by an older version read as their defaults."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**d)

    def section(self, role: str) -> dict[str, SettingValue]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("role", RESULT) == role}


@dataclass
class AlexNetConfig(_Settings):
    num_classes: int = setting(1000, "Outputs of fc8 (§2: ILSVRC's 1000 categories); set from the train manifest.",
                               minimum=1, role=DATA)
    width: float = setting(1.0, "Channel multiplier, not in the paper (1.0 is the paper's net; demo runs use less).")
    crop: int = setting(224, "Training/test patch (§4.1: 224), cut from the shards' short side (256). 227 is Caffe's "
                        "unpadded crop; every other size pads conv1 by 2 as torchvision's 224 does. Smaller crops "
                        "(from smaller shards) train faster; docs/paper.md lists each layer's size.",
                        minimum=SMALLEST_CROP)
    dropout: float = setting(0.5, "Probability of zeroing each hidden neuron of fc6 and fc7 (§4.2).", minimum=0.0)
    lrn_size: int = setting(5, "LRN window n: adjacent kernel maps summed over (§3.3).", minimum=1)
    lrn_alpha: float = setting(1e-4, "LRN α (§3.3), as printed; see --lrn-convention.", minimum=0.0)
    lrn_beta: float = setting(0.75, "LRN β (§3.3).", minimum=0.0)
    lrn_k: float = setting(2.0, "LRN k (§3.3).", minimum=0.0)
    lrn_convention: str = setting("paper", "paper: α·Σa² as printed in §3.3; caffe: (α/n)·Σa² as Caffe, "
                                  "cuda-convnet2 and PyTorch compute it.", choices=LRN_CONVENTIONS, flags=("--lrn",))
    activation: str = setting("relu", "The neurons' non-linearity (§3.1): relu, or tanh (the saturating "
                              "neuron of Figure 1).", choices=ACTIVATIONS)
    norm: str = setting("lrn", "After the ReLU of conv1 and conv2, in each tower: lrn (§3.3), none, or batch "
                        "(BatchNorm2d in place of each LRN: the like-for-like swap, not in the paper).", choices=NORMS)
    pool: str = setting("overlap", "Max pooling (§3.4): overlap (z=3, s=2), or plain (z=2, s=2; the same "
                        "55/27/13/6 map sizes).", choices=POOLS)
    towers: int = setting(2, "2: the two-GPU net (§3.2); 1: its footnote's one-GPU net (half the kernels of "
                          "conv1-conv4, conv5 and the fc layers at full size), on one device.", choices=TOWERS)
    init_std: float = setting(0.01, "Std of the N(0, σ) initial weights (§5).", minimum=0.0)
    init: str = setting("paper", "paper: §5's N(0, init_std) weights, biases 1 in conv2/4/5 and fc6/7, 0 elsewhere; "
                        "default: PyTorch's Kaiming-uniform (a narrow demo net does not leave loss ln C from §5's "
                        "init).", choices=INITS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.width > 0:
            raise SettingError("width", f"width must be > 0, got {self.width!r}")
        if not self.dropout < 1:
            raise SettingError("dropout", f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def conv1_padding(self) -> int:
        return conv1_padding(self.crop)

    @property
    def pool5_side(self) -> int:
        """The side of the pooled conv5 maps fc6 reads (6 at 224 and 227)."""
        return map_sides(self.crop, self.pool)["pool5"]

    def channels(self, paper: int) -> int:
        """A tower's channel count for `paper` channels in §3.5, scaled by width."""
        return max(1, round(paper * self.width))


@dataclass
class TrainConfig(_Settings):
    """Defaults are the paper's (§5); each deviation is a named option."""

    epochs: int = setting(90, "Epochs (§5: \"roughly 90 cycles through the training set\").", minimum=1, role=EXTENT)
    max_steps: int | None = setting(None, "Stop after this many steps (default: no limit).", minimum=1, role=EXTENT)
    batch_size: int = setting(128, "GLOBAL batch (§5: 128), split evenly over the ranks.", minimum=1)
    lr: float = setting(0.01, "Initial learning rate (§5).", minimum=0.0)
    momentum: float = setting(0.9, "SGD momentum (§5).", minimum=0.0)
    weight_decay: float = setting(5e-4, "Weight decay (§5).", minimum=0.0)
    lr_drops: int = setting(3, "At most this many lr/10 drops when the val error stops improving (§5: three times "
                            "prior to termination).", minimum=0)
    lr_patience: int = setting(1, "Epochs without val improvement before a drop (the paper does not say).",
                               minimum=0)
    lr_schedule: str = setting("plateau", "plateau: lr/10 when the val error stops improving (§5), never while it is "
                               "at chance level; step: lr/10 every --lr-step-epochs epochs (torchvision's recipe).",
                               choices=LR_SCHEDULES)
    lr_step_epochs: int = setting(30, "Epochs between the drops of --lr-schedule step (torchvision: 30).", minimum=1)
    seed: int = setting(0, "Seed of the initial weights, the loader order and the augmentation.")
    random_crop: bool = setting(True, "Random --crop patches of the short-side square (§4.1: 224 of 256); off: the "
                                "centre patch.")
    mirror: bool = setting(True, "Horizontal reflections with p=0.5 (§4.1).")
    lighting: bool = setting(True, "PCA lighting noise, α ~ N(0, 0.1) per image (§4.1).")
    amp: bool = setting(False, "bf16 autocast.")
    channels_last: bool = setting(False, "Channels-last memory format.")
    compile: bool = setting(False, "torch.compile the model.")
    tf32: bool = setting(True, "On a GPU, fp32 convolutions and matmuls in TF32 (faster, 10-bit mantissa; torch lets "
                         "cuDNN do so by default; metrics.jsonl says precision tf32); off: true fp32. bf16 (--amp) "
                         "steps and the CPU are unaffected.")
    peak_tflops: float | None = setting(None, "This device's dense peak TFLOPS for the precision in use, for mfu in "
                                        "metrics.jsonl (default: pipeline/train/speed.py's table of known cards).",
                                        minimum=0.0, role=RUNTIME)
    loader: str = setting("dali", "dali, or torch (the plain torchvision/webdataset reference path).",
                          choices=LOADERS)
    checkpoint_every: int = setting(500, "Checkpoint every N steps (and at each epoch end).", minimum=1,
                                    role=RUNTIME)
    keep_checkpoints: int = setting(3, "Keep the last K checkpoints.", minimum=1, role=RUNTIME)
    log_every: int = setting(10, "Log to metrics.jsonl every N steps.", minimum=1, role=RUNTIME)
    tensorboard: bool = setting(True, "Also write TensorBoard events into the run folder's tb/ (`make tensorboard` "
                                "shows them); off: metrics.jsonl alone.", role=RUNTIME)
    eval_batch_size: int = setting(128, "Images per validation batch (does not change the result).", minimum=1,
                                   role=RUNTIME)
    loader_threads: int = setting(2, "Loader threads/workers per rank.", minimum=1, role=RUNTIME)
    pca_from_elsewhere: bool = setting(False, "Train with a pca.json not computed from --train's shards (published "
                                       "values, a PCA of other data); without it such a file is refused.",
                                       role=RUNTIME)
    untrained_val_classes: bool = setting(False, "Accept val shards holding classes the training shards lack (they "
                                          "count as errors); without it such val shards are refused.",
                                          role=RUNTIME)
    loader_workers: int = setting(0, "DALI loader: Python worker processes that read the samples in the epoch's order "
                                  "(0: the training process; a few on a GPU, so that reading never waits on a "
                                  "step).", minimum=0, role=RUNTIME)

    def trajectory(self) -> dict[str, SettingValue]:
        """The settings a checkpoint must agree with to be resumed (epochs/max_steps may grow)."""
        return self.section(RESULT)


@dataclass
class ShardSettings(_Settings):
    """What a recipe's images are sharded at (`make prepare RECIPE=…`): the image size's first number; the crop the
    net sees is the model's."""

    short_side: int = setting(256, "Resize so the short side is this many pixels (§2: 256).", minimum=1)


SHORT_SIDE = ShardSettings.short_side  # the shard stage's default (the paper's 256)
SETTINGS = {"model": AlexNetConfig, "train": TrainConfig}  # a recipe's tables and the run's trajectory sections
RECIPE_TABLES = {**SETTINGS, "shards": ShardSettings}  # …and what `make prepare` reads from it


def user_settings(cls) -> list:
    """The fields a recipe or the command line may set (all but those that come from the data)."""
    return [f for f in fields(cls) if f.metadata.get("role", RESULT) != DATA]


def default_of(f):
    return f.default if f.default is not MISSING else f.default_factory()


# ---------------------------------------------------------------------------------------------------------------
# recipes: a small TOML file of [model] and [train] settings; the command line overrides it

RECIPES_DIR = Path(__file__).with_name("recipes")
DEFAULT_RECIPE = "paper"  # the settings' defaults themselves: no file restates them


def recipe_names() -> list[str]:
    return sorted({DEFAULT_RECIPE, *(p.stem for p in RECIPES_DIR.glob("*.toml"))})


def recipe_path(recipe: str | Path) -> Path | None:
    """A shipped recipe by name (demo, tiny) or a TOML file; None for the paper's (the defaults)."""
    if str(recipe) == DEFAULT_RECIPE:
        return None
    if str(recipe) in recipe_names():
        return RECIPES_DIR / f"{recipe}.toml"
    path = Path(recipe)
    if not path.is_file():
        raise PipeError(f"{recipe}: expected one of {', '.join(recipe_names())} or a TOML file; {path} not found",
                        option="recipe")
    return path


def load_recipe(recipe: str | Path) -> dict[str, dict]:
    """{"model": {...}, "train": {...}, "shards": {...}} from a recipe, each key checked against the settings' fields
    and types, and its crop against its short side."""
    path = recipe_path(recipe)
    if path is None:
        return {section: {} for section in RECIPE_TABLES}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PipeError(f"{path}: not a valid TOML recipe ({e})") from None
    unknown = set(data) - set(RECIPE_TABLES)
    if unknown:
        raise PipeError(f"{path}: unknown table or key {sorted(unknown)[0]!r}; a recipe holds the tables "
                        f"{', '.join(f'[{s}]' for s in RECIPE_TABLES)}")
    resolved = {}
    for section, cls in RECIPE_TABLES.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise PipeError(f"{path}: {section} must be a table [{section}], got {table!r}")
        allowed = {f.name: f for f in user_settings(cls)}
        hints = typing.get_type_hints(cls)
        for key, value in table.items():
            if key not in allowed:
                raise PipeError(f"{path}: unknown key {section}.{key}; valid keys: {', '.join(allowed)}")
            problem = _type_problem(value, hints[key], allowed[key].metadata)
            if problem:
                raise PipeError(f"{path}: {section}.{key} = {value!r}: {problem}")
        resolved[section] = dict(table)
    crop, side = resolved["model"].get("crop", AlexNetConfig.crop), resolved["shards"].get("short_side", SHORT_SIDE)
    if crop > side:
        raise PipeError(f"{path}: model.crop = {crop}: expected at most shards.short_side ({side}), the side it is "
                        "cut from")
    return resolved


def recipe_value(recipe: str | Path, key: str) -> SettingValue:
    """One resolved value of a recipe, `table.key` (`shards.short_side`): the recipe's, else the default."""
    table, _, name = key.partition(".")
    cls = RECIPE_TABLES.get(table)
    if cls is None or name not in {f.name for f in user_settings(cls)}:
        keys = [f"{t}.{f.name}" for t, c in RECIPE_TABLES.items() for f in user_settings(c)]
        raise PipeError(f"{key}: expected a recipe key such as shards.short_side or model.crop; valid keys: "
                        f"{', '.join(keys)}")
    return load_recipe(recipe)[table].get(name, getattr(cls(), name))


def recipe_lines(recipe: str | Path) -> list[str]:
    """The recipe's resolved tables as TOML lines; a value the recipe sets is marked with the paper's beside it."""
    loaded = load_recipe(recipe)
    lines: list[str] = []
    for table, cls in RECIPE_TABLES.items():
        lines += [*([""] if lines else []), f"[{table}]"]
        for f in user_settings(cls):
            set_here = f.name in loaded[table]
            value = loaded[table][f.name] if set_here else default_of(f)
            note = f"  # this recipe (paper: {_toml(default_of(f))})" if set_here else ""
            lines.append(f"# {f.name}: not set" if value is None else f"{f.name} = {_toml(value)}{note}")
    return lines


def _toml(value: SettingValue) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else str(value)


def _type_problem(value, hint, metadata) -> str | None:
    choices, minimum = metadata.get("choices"), metadata.get("minimum")
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    base = next(t for t in (bool, int, float, str) if hint is t or hint == t | None)
    ok = isinstance(value, bool) if base is bool else (
        isinstance(value, base) or (base is float and isinstance(value, int))) and not isinstance(value, bool)
    if not ok:
        return f"expected {expected[base]}"
    if choices and value not in choices:
        return f"expected one of {', '.join(map(str, choices))}"
    if minimum is not None and value < minimum:
        return f"expected at least {minimum}"
    return None


def resolve_settings(recipe: str | Path = DEFAULT_RECIPE, overrides: dict | None = None
                     ) -> tuple[AlexNetConfig, TrainConfig]:
    """The dataclass defaults, then the recipe's values, then the command line's (`overrides`: field → value, None =
    not given). A value the settings refuse is one line naming the setting (exit 2)."""
    loaded = load_recipe(recipe)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    built = []
    for section, cls in SETTINGS.items():
        names = {f.name for f in user_settings(cls)}
        values = {**loaded[section], **{k: v for k, v in given.items() if k in names}}
        try:
            built.append(cls(**values))
        except SettingError as e:
            source = "" if e.name in given else f"{recipe_path(recipe)}: "
            raise PipeError(f"train: {source}{e}") from None
    unknown = set(given) - {f.name for cls in SETTINGS.values() for f in user_settings(cls)}
    if unknown:
        raise ValueError(f"not settings: {sorted(unknown)}")
    return built[0], built[1]


def upgrade_train_settings(train: dict) -> dict:
    """Training settings as an older version stored them, in today's keys: the old `augment` dict is the three
    booleans."""
    out = dict(train)
    out.update(out.pop("augment", None) or {})
    return out


def upgrade_trajectory(settings: dict) -> dict:
    """A run's recorded settings as this version writes them, so that a run folder from an older version is not
    refused: absent keys read as their defaults; the old `train.augment` dict is the three booleans."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items()}
    out["train"] = upgrade_train_settings(out.get("train", {}))
    for section, cls in SETTINGS.items():
        current = out.setdefault(section, {})
        keep = {f.name for f in fields(cls)} if section == "model" else set(TrainConfig().trajectory())
        for f in fields(cls):
            if f.name in keep:
                current.setdefault(f.name, default_of(f))
    return out
