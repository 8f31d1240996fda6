"""pipeline/train/speed.py: data-wait share and step time of a log interval, peak table, MFU, TF32 labelling (CPU twin;
the CUDA-event path runs in bench/gpu.sh)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from pipeline.config import AlexNetConfig
from pipeline.model import forward_flops
from pipeline.train.speed import Interval, StepClock, mfu, peak_tflops, precision, set_tf32


def run_steps(clock: StepClock, steps: int, fetch_s: float, step_s: float) -> dict:
    """The training loop's order: fetch (marked), step, ..., then the interval's figures after a step."""
    batches = iter(range(steps))
    for _ in range(steps):
        clock.fetch_started()
        time.sleep(fetch_s)  # the loader producing the batch
        next(batches)
        clock.fetch_done()
        time.sleep(step_s)  # the training step
    return clock.interval()


def test_the_clock_splits_an_interval_into_waiting_for_data_and_stepping():
    clock = StepClock(torch.device("cpu"))
    first = run_steps(clock, 5, fetch_s=0.03, step_s=0.01)  # 3/4 of the time waiting for data
    assert first.steps == 5
    assert 0.6 < first.data_wait < 0.85
    assert 10 <= first.step_ms < 30
    second = run_steps(clock, 3, fetch_s=0.0, step_s=0.03)  # the next interval starts afresh: little waiting
    assert second.steps == 3 and second.data_wait < 0.2 and second.step_ms >= 30


def test_time_between_epochs_counts_neither_as_waiting_nor_as_stepping():
    clock = StepClock(torch.device("cpu"))
    run_steps(clock, 1, fetch_s=0.0, step_s=0.01)
    clock.fetch_started()
    time.sleep(0.2)  # the epoch's loader runs out; validation and a checkpoint follow, outside the steps
    figures = run_steps(clock, 2, fetch_s=0.01, step_s=0.01)
    assert figures.steps == 2 and figures.step_ms < 100 and 0.3 < figures.data_wait < 0.7


def test_an_interval_without_steps_is_empty_not_an_error():
    assert StepClock(torch.device("cpu")).interval() == Interval(0.0, 0.0, 0)


def test_peaks_come_from_the_card_name_and_dtype():
    assert peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert peak_tflops("NVIDIA H200", "fp32") == 66.9
    assert peak_tflops("NVIDIA H100 PCIe", "tf32") == 378.0  # not the SXM's 494.7
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("cpu", "fp32") is None and peak_tflops("NVIDIA GeForce GT 710", "bf16") is None


def test_mfu_is_three_forward_passes_per_image_over_the_peak():
    flops = forward_flops(AlexNetConfig())
    # the GPU goal: 18,000 images/s in bf16 on an H200 is 7.9% of its dense bf16 peak
    assert mfu(18_000, flops, 989.4) == pytest.approx(18_000 * 3 * 1_448_813_632 / 989.4e12)
    assert mfu(18_000, flops, 989.4) == pytest.approx(0.0791, abs=1e-4)
    assert mfu(18_000, flops, None) is None


def test_fp32_on_a_gpu_is_labelled_tf32_until_tf32_is_turned_off():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        set_tf32(True)
        assert precision(cuda, amp=False) == "tf32" and torch.backends.cuda.matmul.allow_tf32
        set_tf32(False)
        assert precision(cuda, amp=False) == "fp32" and not torch.backends.cuda.matmul.allow_tf32
        assert precision(cuda, amp=True) == "bf16" and precision(cpu, amp=False) == "fp32"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.slow
def test_peak_tflops_gives_the_cpu_run_an_mfu_and_stays_out_of_the_runs_settings_key(tiny_data, train_cmd, cli,
                                                                                      tmp_path):
    run = tmp_path / "run"
    cli(*train_cmd(tiny_data, run, max_steps=2, peak_tflops=0.002))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    flops = forward_flops(AlexNetConfig(width=0.125))  # the tiny run's net (conftest TINY_TRAIN)
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:  # one rank: its images/s is the run's
        assert r["precision"] == "fp32" and r["step_ms"] > 0 and 0 <= r["data_wait"] < 1
        per_image = 3 * flops / 0.002e12  # images_per_s is logged to 0.1, mfu to 1e-5
        assert r["mfu"] == pytest.approx(r["images_per_s"] * per_image, abs=0.05 * per_image + 1e-5)
    again = cli(*train_cmd(tiny_data, run, max_steps=2, peak_tflops=5.0))  # another peak: the same run
    assert "up to date" in again.stderr + again.stdout
