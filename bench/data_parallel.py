"""GPU mode's data-parallel rows: our training step on 1 GPU and on every visible GPU, throughput per GPU.

Each N is one launch of ``torchrun --standalone --nproc-per-node N -m bench.data_parallel`` (the launcher users
run): every process builds the random-weight FLUX and the synthetic cache on its own GPU and trains
``trainer_core.train.TrainingSession`` with batch 1 per GPU; process 0 times the optimizer steps and writes the
result as JSON. With fewer than two GPUs the row says so instead. ``--device cpu`` (the tiny-model dry run)
launches two gloo processes on the CPU, to exercise this code, not to measure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESET = "24gb"  # fp8 base, no compile: the same memory plan on every GPU of a multi-GPU machine


def processes_to_compare(device: str) -> int:
    return torch.cuda.device_count() if device == "cuda" else 2


def rows(args) -> list[str]:
    """Markdown table lines: N = 1 and N = all, at the largest resolution of the run."""
    n = processes_to_compare(args.device)
    resolution = max(args.resolutions)
    preset = PRESET if args.device == "cuda" else "none"
    header = ["", f"Data parallel (torchrun, preset {preset}, batch 1 per process, {resolution}²):", "",
              "| processes | s/step | samples/s | samples/s per GPU | scaling per GPU |", "|---|---|---|---|---|"]
    if n < 2:
        return header + [f"| 1 vs all | skipped: {n} GPU |  |  |  |"]
    results = {count: launch(count, args, resolution) for count in (1, n)}
    lines = header
    base = results[1].get("per_gpu")
    for count, r in results.items():
        if "error" in r:
            lines.append(f"| {count} | failed: {r['error']} |  |  |  |")
            continue
        scaling = f"{r['per_gpu'] / base:.0%}" if base else "–"
        lines.append(f"| {count} | {r['seconds']:.3f} | {r['samples_per_second']:.2f} | {r['per_gpu']:.2f} | "
                     f"{scaling} |")
    return lines


def launch(count: int, args, resolution: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="flux-bench-dp-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(count),
                   "-m", "bench.data_parallel", "--model", args.model, "--device", args.device,
                   "--resolution", str(resolution), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--out", str(out)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
            print(done.stderr[-4000:], file=sys.stderr)
            return dict(error=f"exit {done.returncode}: {tail}")
        return json.loads(out.read_text())


def worker(argv=None) -> None:
    """One process of a launch: train and time; process 0 writes the result."""
    from trainer_core import distributed, memory

    from .workloads import model_config, our_step, random_flux, synthetic_cache, text_tokens

    parser = argparse.ArgumentParser()
    for name, kind in (("--model", str), ("--device", str), ("--resolution", int), ("--steps", int),
                       ("--warmup", int), ("--out", str)):
        parser.add_argument(name, type=kind, required=True)
    args = parser.parse_args(argv)
    device = distributed.setup(args.device)
    cuda = device.type == "cuda"
    config = model_config(args.model)
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = text_tokens(args.model)
    with tempfile.TemporaryDirectory(prefix="flux-bench-dp-cache-") as folder:
        cache = synthetic_cache(folder, args.resolution, config, text_tokens=tokens)
        workload = memory.Workload(config, args.resolution, 1, 16, "attention", "adamw", tokens,
                                   "bf16" if cuda else "fp32")
        mem = memory.resolve_preset(PRESET if cuda else "none", {"batch_size": 1}, None, workload)
        step, close = our_step(random_flux(config, device, dtype), cache, mem, rank=16, device=device,
                               compute_dtype="bf16" if cuda else "fp32", optimizer="adamw")
        times = []
        for _ in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()  # ends in the gradient all-reduce and the optimizer step, so every process is in step
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        close()
    seconds = statistics.median(times[args.warmup:])
    n = distributed.world_size()
    if distributed.is_main():
        Path(args.out).write_text(json.dumps(dict(seconds=seconds, samples_per_second=n / seconds,
                                                  per_gpu=1 / seconds, processes=n)))
    distributed.teardown()


if __name__ == "__main__":
    worker()
