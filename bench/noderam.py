"""Node host-RAM rows: ``python -m bench noderam`` (needs COMFYUI_DIR and COMFYUI_PYTHON, as the real-ComfyUI tests).

Writes a FLUX.1 file ComfyUI's UNETLoader accepts at full width (3072, 2 double + 3 single blocks, ≈ 2.2 GB in
bf16; 768-wide text inputs so a CLIP-L stands in for T5, tests/integration/fixtures.py) and, per row, starts a
fresh headless ComfyUI (tests/integration/comfy_server.py): one prompt loads the MODEL, CLIP and VAE and samples
the base once (as a user does before training), then the RSS of ComfyUI's process (children included) is read and
its peak reset (``/proc/<pid>/clear_refs``), and a second prompt runs FLUX LoRA Cache → FLUX LoRA Train
(2 steps, rank 16) on the cached MODEL while the RSS is also polled every 20 ms. Peak = the larger of the kernel's
high-water mark and the polled maximum. Goal: peak ≤ 1.1 × RSS after loading + 1.5 GiB.

Rows: the MODEL as UNETLoader loads it by default (fp32 on CPU: training shares every weight); the same MODEL with
a LoRA on every block weight applied by LoraLoaderModelOnly — the copying path, as every run copied the base before
the node trained on ComfyUI's tensors (the merged weights are new tensors, in the training dtype); and the MODEL
loaded with weight_dtype fp8_e4m3fn (training keeps its base in fp8 on ComfyUI's own fp8 tensors); and that fp8
MODEL with the trainer's own block swap (FLUX LoRA Memory, blocks_to_swap 3): the swap packs each swapped block's
frozen weights into one host buffer (page-locked on a GPU) laid out like its device slot, a second host copy of those
blocks beside ComfyUI's.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
WORKFLOW = ROOT / "workflows" / "api" / "flux_lora_train.json"
DOUBLE_BLOCKS, SINGLE_BLOCKS = 2, 3
LORA_FILE = "every_block_weight_r4.safetensors"
STEPS = 2


@dataclass
class Row:
    name: str
    weight_dtype: str
    lora: bool
    swap: int = 0  # blocks_to_swap on a FLUX LoRA Memory node (preset none, checkpointing on)
    after_load: int = 0
    peak: int = 0
    copied: str = ""

    @property
    def goal(self) -> float:
        return 1.1 * self.after_load + 1.5 * GiB

    def line(self) -> str:
        met = "met" if self.peak <= self.goal else "MISSED"
        return (f"| {self.name} | {self.after_load / GiB:.2f} | {self.peak / GiB:.2f} | "
                f"{(self.peak - self.after_load) / GiB:+.2f} | {self.goal / GiB:.2f} | {met} | {self.copied} |")


ROWS = [Row("shared: UNETLoader default (fp32 on CPU)", "default", False),
        Row("fp8: UNETLoader weight_dtype fp8_e4m3fn", "fp8_e4m3fn", False),
        Row("fp8 + the trainer's block swap (3 of 5 blocks)", "fp8_e4m3fn", False, swap=3),
        Row("copy baseline: + LoraLoaderModelOnly, LoRA on every block weight", "default", True)]


def _integration(name: str):
    sys.path.insert(0, str(ROOT / "tests" / "integration"))  # tests/ is no package; the tests import it this way
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def prompts(fx, row: Row) -> tuple[dict, dict]:
    """(load prompt, train prompt) from the shipped workflow on the fixtures: the first samples the base MODEL
    once at 64², the second runs the cache and training nodes (and the loss graph that makes them run)."""
    api = json.loads(WORKFLOW.read_text())
    kinds = {node["class_type"]: key for key, node in api.items()}
    unet, train = kinds["UNETLoader"], kinds["FluxLoraTrain"]
    api[unet]["inputs"].update(unet_name=fx.flux, weight_dtype=row.weight_dtype)
    clip = kinds["DualCLIPLoader"]
    api[clip] = {"class_type": "CLIPLoader", "inputs": {"clip_name": fx.clip, "type": "stable_diffusion"}}
    api[kinds["VAELoader"]]["inputs"]["vae_name"] = fx.vae
    api[kinds["FluxLoraDataset"]]["inputs"].update(folder=fx.dataset, resolutions="64")
    api[train]["inputs"].update(steps=STEPS, checkpoint_every=0, sample_every=0, output_name="noderam")
    api[kinds["EmptySD3LatentImage"]]["inputs"].update(width=64, height=64)
    if row.lora:
        api["900"] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": [unet, 0], "lora_name": LORA_FILE, "strength_model": 1.0}}
        api[train]["inputs"]["model"] = ["900", 0]
    if row.swap:
        api["901"] = {"class_type": "FluxLoraMemory", "inputs": {
            "preset": "none", "base_precision": "from preset", "blocks_to_swap": row.swap,
            "gradient_checkpointing": "on", "offload_activations": "from preset", "compile_blocks": "from preset",
            "vram_budget_gb": 0.0, "resolution": 64}}
        api[train]["inputs"]["memory"] = ["901", 0]
    sampler = min(k for k, v in api.items() if v["class_type"] == "KSampler")
    api[sampler]["inputs"].update(model=[unet, 0], steps=1)
    decode = next(k for k, v in api.items() if v["class_type"] == "VAEDecode" and v["inputs"]["samples"][0] == sampler)
    save = next(k for k, v in api.items() if v["class_type"] == "SaveImage" and v["inputs"]["images"][0] == decode)
    return _needed_by(api, save), _needed_by(api, kinds["LossGraphNode"])


def _needed_by(api: dict, output: str) -> dict:
    keep, todo = set(), [output]
    while todo:
        node_id = todo.pop()
        if node_id not in keep:
            keep.add(node_id)
            todo += [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
    return {k: v for k, v in api.items() if k in keep}


def rss(process: psutil.Process) -> int:
    return process.memory_info().rss + sum(child.memory_info().rss for child in process.children(recursive=True))


def high_water_mark(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class Poll(threading.Thread):
    """The largest RSS (process + children) seen while running."""

    def __init__(self, process: psutil.Process):
        super().__init__(daemon=True)
        self.process, self.peak, self.done = process, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, rss(self.process))
            except psutil.NoSuchProcess:
                return  # ComfyUI died (run_row reports it)
            time.sleep(0.02)


def run_row(fx, row: Row, start_comfyui) -> dict:
    load, train = prompts(fx, row)
    with start_comfyui(fx.base) as server:
        history = server.wait(server.queue(load), timeout=1800)
        assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
        process = psutil.Process(server.pid)
        time.sleep(2)
        row.after_load = rss(process)
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
        poll = Poll(process)
        poll.start()
        started = time.monotonic()
        try:
            history = server.wait(server.queue(train), timeout=3600)
        finally:
            poll.done.set()
            poll.join()
            row.peak = poll.peak
        assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
        row.peak = max(high_water_mark(server.pid), poll.peak)
        sharing = re.findall(r"(\d+) of (\d+) tensors shared, (\d+) copied \(([\d.]+) GiB", server.log_text())
        shared, total, _, gib = sharing[-1]
        row.copied = f"{shared}/{total} shared, {gib} GiB copied"
        system = server.request("/system_stats")["system"]
        print(row.line(), f"({time.monotonic() - started:.0f} s)", flush=True)
        return system


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"CPU {cpu} ({os.cpu_count()} cores), {psutil.virtual_memory().total / GiB:.0f} GiB RAM"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench noderam", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    comfy_server, fixtures = _integration("comfy_server"), _integration("fixtures")
    if not comfy_server.configured():
        parser.error(comfy_server.SKIP_REASON)
    with tempfile.TemporaryDirectory() as tmp:
        fx = fixtures.build_fixtures(Path(tmp), DOUBLE_BLOCKS, SINGLE_BLOCKS)
        flux_file = fx.base / "models" / "diffusion_models" / fx.flux
        fixtures.write_block_lora(fx.base / "models" / "loras" / LORA_FILE, load_file(str(flux_file)))
        size = flux_file.stat().st_size
        system = {}
        for row in ROWS:
            try:
                system = run_row(fx, row, comfy_server.start_comfyui) or system
            except (Exception, pytest.fail.Exception) as exc:  # the launcher reports with pytest.fail
                row.copied = f"FAILED: {str(exc).splitlines()[0][:120]} (RSS polled up to {row.peak / GiB:.2f} GiB)"
                print(row.line(), flush=True)
    version = system.get("comfyui_version", "?")
    text = (f"## Node host RAM: FluxLoraTrain in ComfyUI {version}\n\n"
            f"Machine: {machine()}; ComfyUI {version} --cpu, torch {system.get('pytorch_version', '?')}, Python "
            f"{system.get('python_version', '?').split()[0]}\n"
            f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}; command: `COMFYUI_DIR=… COMFYUI_PYTHON=… "
            f"python -m bench noderam`\n\n"
            f"Fixture: FLUX.1 file, width 3072, {DOUBLE_BLOCKS} double + {SINGLE_BLOCKS} single blocks, "
            f"{size / GiB:.2f} GiB in bf16, loaded by UNETLoader; CLIP-L and TAESD stand-ins; 4 images at 64², "
            f"{STEPS} steps, rank 16, adamw. Each row is a fresh ComfyUI: after-load = RSS of its process (children "
            f"included) after it loaded the models and sampled the base once; peak = its RSS high-water mark during "
            f"the FLUX LoRA Cache + Train prompt.\n\n"
            "| row | RSS after load GiB | peak RSS GiB | peak − after load | goal (1.1 × after load + 1.5 GiB) | "
            "| bridge (node log) |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(row.line() for row in ROWS) + "\n")
    print(text)
    if not args.no_write:
        from .dryrun import write_results

        write_results(text, f"<!-- noderam {version} -->")
    shared = [row for row in ROWS if not row.lora]
    return 0 if all(row.peak <= row.goal for row in shared) else 1
