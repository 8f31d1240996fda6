"""The parts of the GPU check (bench/gpu.sh) that are not a CLI command or another benchmark. Each prints one JSON
line; `summary` reads every step's log back and writes summary.json and summary.md.

    python bench/gpu_check.py record
    python bench/gpu_check.py pixels --val DIR --pca JSON --device cuda:0
    python bench/gpu_check.py clock --device cuda:0
    python bench/gpu_check.py placement --devices cuda:0,cuda:1 [--width W]
    python bench/gpu_check.py learning --shards DIR --pca JSON --device cuda:0 --seconds S [--width W] [--loader L]
    python bench/gpu_check.py summary WORK OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from pipeline.augment import make_eval_loader, make_train_loader
from pipeline.augment.dali import DALI_IMPORT_ERROR
from pipeline.config import AlexNetConfig, TrainConfig
from pipeline.model import build_model, forward_flops
from pipeline.records import Pca
from pipeline.train.loop import train_step
from pipeline.train.schedule import make_optimizer
from pipeline.train.speed import StepClock, mfu, peak_tflops, set_tf32

GOALS = {"train_bf16_images_per_s": 18_000, "dali_mixed_images_per_s": 20_000, "data_wait": 0.05}
LEARNED = 0.5  # "learning has started": the training loss 0.5 below ln(C)


def record(_: argparse.Namespace) -> dict:
    """What made the figures: the run record every train run and eval writes (pipeline/record.py), plus the
    driver and torch's TF32 defaults."""
    from pipeline.record import run_record

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {"check": "record", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **run_record().to_json(), "dali_import_error": DALI_IMPORT_ERROR, "driver": driver,
            "tf32_default": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}


def pixels(args: argparse.Namespace) -> dict:
    """The largest difference between the same val samples decoded on `device` (DALI mixed: nvJPEG) and on the CPU
    (libjpeg-turbo), after the centre crop and mean subtraction, in 0-255 pixel levels."""
    pca = Pca.read(args.pca)
    batches = {d: next(iter(make_eval_loader(args.val, pca, args.batch_size, device=d, num_threads=4)))[0].cpu()
               for d in (args.device, "cpu")}
    diff = (batches[args.device] - batches["cpu"]).abs()
    return {"check": "pixels", "devices": [args.device, "cpu"], "images": len(diff),
            "max_abs_diff": round(diff.max().item(), 3), "mean_abs_diff": round(diff.mean().item(), 4)}


def clock(args: argparse.Namespace) -> dict:
    """The data_wait figure itself on this device: a loader (host sleep) taking a quarter of a step's time, then
    three steps' time. On a GPU the first reads about 0 (queued steps keep the GPU busy while the host waits; host
    time would say 20%) and the second about 2/3 (the GPU finishes its step within the wait); on the CPU, 1/5 and
    3/4, the host's share."""
    device = torch.device(args.device)
    x = torch.randn(args.size, args.size, device=device) / args.size ** 0.5

    def step() -> None:  # a fixed amount of device work, queued without waiting on a GPU
        y = x
        for _ in range(args.matmuls):
            y = y @ x

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(), sync()
    started = time.perf_counter()
    for _ in range(5):
        step()
    sync()
    step_s = (time.perf_counter() - started) / 5
    result = {"check": "clock", "device": args.device, "step_ms": round(1000 * step_s, 3)}
    for name, fetch_s in (("quarter_step_loader", step_s / 4), ("three_step_loader", 3 * step_s)):
        timer = StepClock(device)
        for _ in range(args.steps):
            timer.fetch_started()
            time.sleep(fetch_s)
            timer.fetch_done()
            step()
        result[name] = round(timer.interval().data_wait, 4)
    return result


def placement(args: argparse.Namespace) -> dict:
    """The towers on two devices compute what they compute on one (same weights, eval mode, fp32 without TF32)."""
    set_tf32(False)
    devices = args.devices.split(",")
    config = AlexNetConfig(width=args.width)
    torch.manual_seed(0)
    one = build_model(config, devices[:1]).eval()
    two = build_model(config, devices).eval()
    two.load_state_dict(one.state_dict())
    x = torch.randn(8, 3, 224, 224, device=devices[0]) * 50
    with torch.no_grad():
        diff = (one(x) - two(x)).abs().max().item()
    return {"check": "placement", "devices": devices, "max_abs_logit_diff": diff, "equal": diff < 1e-4}


def learning(args: argparse.Namespace) -> dict:
    """Does the paper recipe start learning? Steps of the paper's SGD (bf16 on a GPU, fp32 on the CPU) from the paper
    init and from PyTorch's default init, the same time each: the first step whose loss (mean of 10) is 0.5 below
    ln(C)."""
    pca, device = Pca.read(args.pca), torch.device(args.device)
    cfg = TrainConfig()
    rows = []
    for init in ("paper", "default"):
        torch.manual_seed(0)
        config = AlexNetConfig(width=args.width, init=init)
        model = build_model(config, [device]).to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, cfg)
        loader = make_train_loader(args.shards, pca, cfg.batch_size if args.batch_size is None else args.batch_size,
                                   loader=args.loader, device=args.device, channels_last=True,
                                   num_threads=min(8, os.cpu_count() or 1))
        losses: list[torch.Tensor] = []
        started, epoch = time.perf_counter(), 0
        while time.perf_counter() - started < args.seconds and len(losses) < args.max_steps:
            loader.set_epoch(epoch)
            for images, labels in loader:
                losses.append(train_step(model, optimizer, images, labels, amp=device.type == "cuda")[0])
                if len(losses) % 50 == 0 and time.perf_counter() - started >= args.seconds:
                    break
            epoch += 1
        curve = torch.stack(losses).float().cpu()
        smooth = curve.unfold(0, 10, 1).mean(1) if len(curve) >= 10 else curve[-1:]
        below = (smooth < math.log(config.num_classes) - LEARNED).nonzero()
        first = int(below[0]) + min(10, len(curve)) if len(below) else None
        rows.append({"init": init, "steps": len(curve), "seconds": round(time.perf_counter() - started, 1),
                     "first_loss": round(curve[:10].mean().item(), 4), "last_loss": round(curve[-10:].mean().item(), 4),
                     "first_step_below": first})
    return {"check": "learning", "classes": config.num_classes, "ln_classes": round(math.log(config.num_classes), 4),
            "width": args.width, "device": args.device, "loader": args.loader, "runs": rows}


# ---------------------------------------------------------------------------------------------------------------
# summary


def json_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def run_figures(run: Path) -> dict | None:
    """The CLI run's speed from metrics.jsonl: medians over the second half of the logged steps (the first half holds
    start-up, cuDNN autotuning and the first epoch's pipeline build)."""
    steps = [r for r in json_lines(run / "metrics.jsonl") if "images_per_s" in r]
    if not steps:
        return None
    steady = steps[len(steps) // 2:]
    figures = {"logged_steps": len(steps), "last_step": steps[-1]["step"]}
    for key in ("images_per_s", "data_wait", "step_ms", "mfu"):
        values = [r[key] for r in steady if r.get(key) is not None]
        figures[key] = round(statistics.median(values), 4) if values else None
    return figures


def summary(args: argparse.Namespace) -> dict:
    work, out = Path(args.work), Path(args.out)
    logs = work / "logs"
    steps = {}
    for status in sorted(logs.glob("*.status")):
        state, seconds = status.read_text().split()[:2]
        steps[status.stem] = {"status": state, "seconds": int(seconds),
                              "rows": json_lines(status.with_suffix(".log"))}
    rows = {"record": [record(args)], **{name: step["rows"] for name, step in steps.items()}}
    gpu = next((r["gpus"][0] for r in rows.get("record", []) if r.get("gpus")), "cpu")
    for step_rows in rows.values():  # MFU of the training-step rows of our models (torchvision's differs)
        for r in step_rows:
            if r.get("bench") == "train" and r["model"] in ("two-tower", "grouped"):
                flops = forward_flops(AlexNetConfig(width=r["width"], crop=r["crop"]))
                m = mfu(r["images_per_s"], flops, peak_tflops(gpu, r["precision"]))
                r["mfu"] = None if m is None else round(m, 4)
    runs = {p.name: run_figures(p) for p in sorted((work / "runs").glob("*")) if p.is_dir()}
    evals = {}
    for p in sorted((work / "eval").glob("*/eval.json")):
        e = json.loads(p.read_text())
        evals[p.parent.name] = {k: e[k].get("images_per_s") for k in ("centre", "ten_crop")
                                if isinstance(e.get(k), dict)}
    result = {"gpu": gpu, "steps": {k: {"status": v["status"], "seconds": v["seconds"]} for k, v in steps.items()},
              "results": rows, "runs": runs, "eval": evals, "goals": GOALS}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(result))
    return {"check": "summary", "steps": len(steps), "failed": [k for k, v in steps.items() if v["status"] != "ok"]}


def markdown(s: dict) -> str:
    lines = [f"# GPU check: {s['gpu']}", ""]
    for r in s["results"].get("record", []):
        lines += [f"{k}: {v}" for k, v in r.items() if k != "check"] + [""]
    lines += ["| step | status | s |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in s["steps"].items()] + [""]
    lines += ["| loader | kind | device | threads | images/s | vs torch reference |", "|---|---|---|---|---|---|"]
    for rows in s["results"].values():
        lines += [f"| {r['loader']} | {r['kind']} | {r['device']} | {r['threads']} | {r['images_per_s']:,.0f} | "
                  f"{r['vs_torch']:.2f}x |" for r in rows if r.get("bench") == "loader"]
    lines += ["", "| train step | model | precision | channels-last | compile | images/s | MFU |",
              "|---|---|---|---|---|---|---|"]
    for name, rows in s["results"].items():
        lines += [f"| {name} | {r['model']} | {r['precision']} | {r['channels_last']} | {r['compile']} | "
                  f"{r['images_per_s']:,.1f} | {r.get('mfu')} |" for r in rows if r.get("bench") == "train"]
    lines += ["", "| CLI run | logged steps | images/s | data_wait | step_ms | mfu |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['logged_steps']} | {v['images_per_s']} | {v['data_wait']} | {v['step_ms']} | {v['mfu']} |"
              for k, v in s["runs"].items() if v]
    lines += ["", "| eval | centre images/s | 10-crop images/s |", "|---|---|---|"]
    lines += [f"| {k} | {v.get('centre')} | {v.get('ten_crop')} |" for k, v in s["eval"].items()]
    for name in ("pixels", "clock", "placement", "learning"):
        lines += [""] + [f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'check'})}"
                         for r in s["results"].get(name, [])]
    lines += ["", f"goals: {json.dumps(s['goals'])}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("record").set_defaults(run=record)
    p = sub.add_parser("pixels")
    p.add_argument("--val", type=Path, required=True)
    p.add_argument("--pca", type=Path, required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(run=pixels)
    p = sub.add_parser("clock")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--size", type=int, default=2048, help="square matrices of this size")
    p.add_argument("--matmuls", type=int, default=40, help="matmuls a step (40 of 2048: ~10 ms on an H200, fp32)")
    p.add_argument("--steps", type=int, default=10, help="steps per loader")
    p.set_defaults(run=clock)
    p = sub.add_parser("placement")
    p.add_argument("--devices", default="cuda:0,cuda:1")
    p.add_argument("--width", type=float, default=1.0)
    p.set_defaults(run=placement)
    p = sub.add_parser("learning")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--pca", type=Path, required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--seconds", type=float, default=30.0, help="per init")
    p.add_argument("--max-steps", type=int, default=5000, help="per init")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=None, help="default: the paper's 128")
    p.add_argument("--loader", default="dali")
    p.set_defaults(run=learning)
    p = sub.add_parser("summary")
    p.add_argument("work")
    p.add_argument("out")
    p.set_defaults(run=summary)
    args = ap.parse_args()
    print(json.dumps(args.run(args)))


if __name__ == "__main__":
    main()
