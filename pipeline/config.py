"""The settings of the model and of training, as plain dataclasses without torch.

Kept apart from `pipeline.model` and `pipeline.train` so that the train stage can decide it is up to date (its cache
key is built from these) without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# An 11x11 stride-4 conv gives 55x55 only from 224 with padding 2 (torchvision) or from 227 unpadded (Caffe).
CONV1_PADDING = {224: 2, 227: 0}
LRN_CONVENTIONS = ("paper", "caffe")
INITS = ("paper", "default")


@dataclass
class AlexNetConfig:
    num_classes: int = 1000        # §2: ILSVRC's 1000 categories
    width: float = 1.0             # not in the paper: channel multiplier for demo runs (1.0: the paper's)
    crop: int = 224                # §4.1: 224x224 patches (227 = Caffe's crop; conv1 padding 0 instead of 2)
    dropout: float = 0.5           # §4.2: zero each hidden neuron of fc6, fc7 with probability 0.5
    lrn_size: int = 5              # §3.3: n = 5 adjacent kernel maps
    lrn_alpha: float = 1e-4        # §3.3: α = 10^-4, as printed (see lrn_convention)
    lrn_beta: float = 0.75         # §3.3: β = 0.75
    lrn_k: float = 2.0             # §3.3: k = 2
    lrn_convention: str = "paper"  # "paper": α·Σa² as printed; "caffe": (α/n)·Σa² (Caffe, cuda-convnet2)
    init_std: float = 0.01         # §5: weights from N(0, 0.01)
    init: str = "paper"            # "paper": §5's N(0, init_std) and 0/1 biases; "default": PyTorch's
    #                                (Kaiming-uniform) — a narrow demo net does not leave loss ln(C) from §5's init

    def __post_init__(self) -> None:
        if self.crop not in CONV1_PADDING:
            raise ValueError(f"crop must be 224 (conv1 padding 2, torchvision) or 227 (padding 0, Caffe), "
                             f"got {self.crop!r}: no other size gives the paper's 55x55 conv1 maps")
        if self.lrn_convention not in LRN_CONVENTIONS:
            raise ValueError(f"lrn_convention must be one of {LRN_CONVENTIONS}, got {self.lrn_convention!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not self.width > 0:
            raise ValueError(f"width must be > 0, got {self.width!r}")
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        # Plain, stable JSON types: the checkpoint stores this dict and the train stage hashes it (1 vs 1.0).
        self.num_classes, self.crop, self.lrn_size = int(self.num_classes), int(self.crop), int(self.lrn_size)
        for name in ("width", "dropout", "lrn_alpha", "lrn_beta", "lrn_k", "init_std"):
            setattr(self, name, float(getattr(self, name)))

    @property
    def conv1_padding(self) -> int:
        return CONV1_PADDING[self.crop]

    def channels(self, paper: int) -> int:
        """A tower's channel count for `paper` channels in §3.5, scaled by width."""
        return max(1, round(paper * self.width))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AlexNetConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"AlexNetConfig: unknown keys {sorted(unknown)}; expected a subset of "
                             f"{[f.name for f in fields(cls)]}")
        return cls(**d)


@dataclass
class TrainConfig:
    """Defaults are the paper's (§5); each deviation is a named option."""

    epochs: int = 90  # "roughly 90 cycles through the training set"
    batch_size: int = 128  # global, split evenly over ranks
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_drops: int = 3  # lr divided by 10 when val error stops improving, "three times prior to termination"
    lr_patience: int = 1  # epochs without improvement before a drop (the paper does not say)
    max_steps: int | None = None
    seed: int = 0
    amp: bool = False  # bf16 autocast
    channels_last: bool = False
    compile: bool = False
    loader: str = "dali"  # or "torch", the reference path
    checkpoint_every: int = 500  # steps; also at every epoch end
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_batch_size: int = 128
    loader_threads: int = 2
    augment: dict = field(default_factory=lambda: {"random_crop": True, "mirror": True, "lighting": True})

    def trajectory(self) -> dict:
        """The settings a checkpoint must agree with to be resumed (epochs/max_steps may grow)."""
        d = asdict(self)
        for k in ("epochs", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "loader_threads",
                  "eval_batch_size"):
            d.pop(k)
        return d
