"""How fast a training run goes and how close to the hardware: per log interval, the share of time the device sat
waiting for data (`data_wait`), the step time (`step_ms`) and the model FLOPs utilization (`mfu`).

On a GPU the host runs ahead of the device, so host time spent in `next(loader)` says little: the GPU may still be
busy with queued steps (the host "waits" while the GPU is 100% busy), and a loader's own GPU work (DALI's `mixed`
decode, the copy into torch's stream) costs the host nothing. `StepClock` therefore records CUDA events on the
training stream just before and just after each fetch: the GPU time between them is time in which the GPU had no
training work because the batch was not ready. On the CPU the same marks are host clock readings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense peak TFLOPS (no sparsity) from NVIDIA's data sheets: (name fragment of torch.cuda.get_device_name, bf16,
# tf32, fp32). First match wins, so the more specific names come first. A card not listed has no MFU unless
# --peak-tflops is given.
PEAK_TFLOPS: tuple[tuple[str, float, float, float], ...] = (
    ("H200 NVL", 835.5, 417.5, 60.0),
    ("H200", 989.4, 494.7, 66.9),  # SXM
    ("H100 PCIe", 756.0, 378.0, 51.2),
    ("H100", 989.4, 494.7, 66.9),  # SXM5
    ("A100", 312.0, 156.0, 19.5),
    ("L40S", 362.1, 183.0, 91.6),
)
PRECISIONS = ("bf16", "tf32", "fp32")
TRAIN_STEP_FLOPS = 3  # forward + backward (twice the forward: gradients of inputs and of weights) per image


def set_tf32(enabled: bool) -> None:
    """TF32 in convolutions (cuDNN's default in torch) and in matmuls (off by default) together, so that "fp32" on
    a GPU means fp32 and "tf32" means every layer."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def precision(device: torch.device, amp: bool) -> str:
    """The arithmetic the steps use: bf16 under autocast; on a GPU, fp32 steps run their convolutions in TF32
    while cuDNN allows it (torch's default)."""
    if amp:
        return "bf16"
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


def peak_tflops(device_name: str, precision_name: str) -> float | None:
    """The card's dense peak for `precision_name`, or None for a card (or the CPU) not in PEAK_TFLOPS."""
    column = PRECISIONS.index(precision_name)
    for fragment, *peaks in PEAK_TFLOPS:
        if fragment in device_name:
            return peaks[column]
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def mfu(images_per_s: float, forward_flops: int, peak: float | None) -> float | None:
    """Model FLOPs utilization: the training FLOPs done per second (3x the forward per image) over the peak."""
    if not peak:
        return None
    return images_per_s * TRAIN_STEP_FLOPS * forward_flops / (peak * 1e12)


class StepClock:
    """Marks around each fetch of a batch; `interval()` sums a log interval up and starts the next.

    Call `fetch_started()` just before `next(loader)`, `fetch_done()` just after (once per step) and `interval()`
    after a step, at the log boundary. On CUDA the marks are events on the current stream, so both sides are on the
    GPU's timeline: the span from one fetch's start to its end is the GPU's idle time for want of data (zero when
    queued steps kept it busy meanwhile); from a fetch's end to the next fetch's start, a step. Time outside those
    spans (validation at an epoch's end, a checkpoint after a log line) counts for neither. With the towers on two
    GPUs the events are on the first one's stream."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._start = self._done = None
        self._fetches: list[tuple] = []
        self._steps: list[tuple] = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, spans: list[tuple]) -> float:
        return sum(a.elapsed_time(b) / 1000 if self.cuda else b - a for a, b in spans)

    def fetch_started(self) -> None:
        self._start = self._mark()
        if self._done is not None:  # the step since the last fetch ended here
            self._steps.append((self._done, self._start))
            self._done = None

    def fetch_done(self) -> None:
        self._done = self._mark()
        self._fetches.append((self._start, self._done))

    def interval(self) -> Interval:
        """The steps since the previous call (on CUDA this waits for the queued steps)."""
        if self._done is not None:
            end = self._mark()
            self._steps.append((self._done, end))
            self._done = None
            if self.cuda:
                end.synchronize()
        waited, stepped, steps = self._seconds(self._fetches), self._seconds(self._steps), len(self._steps)
        self._fetches, self._steps = [], []
        total = waited + stepped
        return Interval(waited / total if total > 0 else 0.0, 1000 * stepped / steps if steps else 0.0, steps)


@dataclass(frozen=True)
class Interval:
    """What `StepClock` measured over some steps: the share of the time spent waiting for data, the mean time of a
    step without its wait, and how many steps."""

    data_wait: float
    step_ms: float
    steps: int


class TrainingSpeed:
    """The speed fields of a logged training step: `data_wait`, `step_ms` (StepClock), `mfu` of this rank's device
    for the precision in use (peak from PEAK_TFLOPS unless given) and that `precision`."""

    def __init__(self, device: torch.device, forward_flops: int, amp: bool, peak: float | None = None):
        self.clock = StepClock(device)
        self.precision = precision(device, amp)
        self.peak = peak or peak_tflops(device_name(device), self.precision)
        self.forward_flops = forward_flops
        self.fetch_started, self.fetch_done = self.clock.fetch_started, self.clock.fetch_done

    def fields(self, images_per_s: float) -> SpeedFields:
        """The interval since the last call; `images_per_s` is this rank's."""
        timing = self.clock.interval()
        utilization = mfu(images_per_s, self.forward_flops, self.peak)
        return SpeedFields(round(timing.data_wait, 4), round(timing.step_ms, 3),
                           None if utilization is None else round(utilization, 5), self.precision)


@dataclass(frozen=True)
class SpeedFields:
    """A logged step's speed: the share of time the device waited for data, the mean step time, the MFU (None
    where the device's peak is unknown, as on a CPU) and the precision it refers to."""

    data_wait: float
    step_ms: float
    mfu: float | None
    precision: str
