"""The pack inside a real ComfyUI: start it headless on a free loopback port with only this pack enabled, build
tiny model files its own loaders accept (fixtures.py), and run the shipped API workflow over HTTP.

Needs COMFYUI_DIR (a ComfyUI checkout, 0.8 or later) and COMFYUI_PYTHON (the Python ComfyUI runs with, with this
pack's requirements installed); skipped otherwise. ``make test-comfyui`` runs it. About 3–4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))  # fixtures.py and comfy_server.py; tests/ is no package
build_fixtures = importlib.import_module("fixtures").build_fixtures
comfy_server = importlib.import_module("comfy_server")
start_comfyui, PACK_FOLDER = comfy_server.start_comfyui, comfy_server.PACK_FOLDER

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_DIR, COMFYUI_PYTHON = comfy_server.COMFYUI_DIR, comfy_server.COMFYUI_PYTHON
WORKFLOW = ROOT / "workflows" / "api" / "flux_lora_train.json"
SNAPSHOT = Path(__file__).parent / "comfyui_core_nodes.json"

pytestmark = pytest.mark.skipif(not comfy_server.configured(), reason=comfy_server.SKIP_REASON)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The tiny model files and dataset, in the folder the server below uses as its base directory."""
    started = time.monotonic()
    fixtures = build_fixtures(tmp_path_factory.mktemp("comfyui"))
    print(f"\nfixtures built in {time.monotonic() - started:.1f} s")
    return fixtures


@pytest.fixture(scope="module")
def server(fx):
    with start_comfyui(fx.base) as srv:
        yield srv


def adapt(api: dict, fx, **train: object) -> dict:
    """The shipped workflow on the tiny fixtures: same graph, fixture files, 64 px, one sampling step.

    DualCLIPLoader becomes CLIPLoader(stable_diffusion) with the same node id: ComfyUI's T5-XXL is fixed at
    4.7 B parameters, so on CPU a CLIP-L provides both the hidden states and the pooled vector.
    """
    api = copy.deepcopy(api)
    seen = set()
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        seen.add(kind)
        if kind == "UNETLoader":
            inputs["unet_name"] = fx.flux
        elif kind == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": fx.clip, "type": "stable_diffusion"}
        elif kind == "VAELoader":
            inputs["vae_name"] = fx.vae
        elif kind == "FluxLoraDataset":
            inputs.update(folder=fx.dataset, resolutions="64")
        elif kind == "FluxLoraTrain":
            inputs.update(rank=4, alpha=4.0, learning_rate=2e-3, timestep_sampling="sigmoid", checkpoint_every=0,
                          sample_every=0)
            inputs.update(train)
        elif kind in ("EmptySD3LatentImage", "EmptyLatentImage"):
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 1
    assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxLoraDataset", "FluxLoraTrain", "KSampler"} <= seen
    return api


def training_only(api: dict) -> dict:
    """The nodes FluxLoraTrain and LossGraphNode need (the loss graph is the output that makes Train run)."""
    keep, todo = set(), [k for k, v in api.items() if v["class_type"] == "LossGraphNode"]
    while todo:
        node_id = todo.pop()
        if node_id not in keep:
            keep.add(node_id)
            todo += [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
    return {k: v for k, v in api.items() if k in keep}


def _node_id(api: dict, class_type: str) -> str:
    return next(k for k, v in api.items() if v["class_type"] == class_type)


def _lora_steps(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["steps"])


def test_comfyui_loads_the_pack_and_the_core_node_snapshot_is_current(server, fx):
    log = server.log_text()
    assert "IMPORT FAILED" not in log, server.log_tail()
    assert re.search(rf"seconds: .*{PACK_FOLDER}", log), "the pack is not in ComfyUI's import list"
    info = server.request("/object_info")
    assert {"FluxLoraDataset", "FluxLoraCache", "FluxLoraMemory", "FluxLoraOptions", "FluxLoraTrain"} <= set(info)
    for name, spec in json.loads(SNAPSHOT.read_text())["nodes"].items():
        live = info[name]
        assert live["output"] == spec["output"], name
        assert {k: v for k, v in live["input_order"].items() if k != "hidden"} == spec["input_order"], name
        for section, inputs in spec["input"].items():
            for input_name, (kind, *options) in inputs.items():
                live_kind, *live_options = live["input"][section][input_name]
                if kind == []:  # the user's files
                    assert isinstance(live_kind, list), (name, input_name)
                    continue
                assert live_kind == kind, (name, input_name)
                live_options = {k: v for k, v in (live_options or [{}])[0].items() if k != "tooltip"}
                assert live_options == (options or [{}])[0], (name, input_name)


def test_training_workflow_runs_and_its_lora_reaches_ksampler(server, fx):
    api = adapt(json.loads(WORKFLOW.read_text()), fx, steps=2, output_name="it_lora")
    # The same sampling without the LoRA, to compare with: the base MODEL into a copy of the first KSampler.
    sampler = min(k for k, v in api.items() if v["class_type"] == "KSampler")
    decode = next(k for k, v in api.items() if v["class_type"] == "VAEDecode" and v["inputs"]["samples"][0] == sampler)
    save = next(k for k, v in api.items() if v["class_type"] == "SaveImage" and v["inputs"]["images"][0] == decode)
    unet, train = _node_id(api, "UNETLoader"), _node_id(api, "FluxLoraTrain")

    def sample_branch(first: int, model: list, prefix: str) -> str:
        api[str(first)] = copy.deepcopy(api[sampler])
        api[str(first)]["inputs"]["model"] = model
        api[str(first + 1)] = {"class_type": "VAEDecode", "inputs": {**api[decode]["inputs"], "samples": [str(first), 0]}}
        api[str(first + 2)] = {"class_type": "SaveImage", "inputs": {"images": [str(first + 1), 0],
                                                                      "filename_prefix": prefix}}
        return str(first + 2)

    base_save = sample_branch(900, [unet, 0], "base")
    # The LORA_MODEL output through ComfyUI's own LoraModelLoader must give the MODEL output's image.
    api["910"] = {"class_type": "LoraModelLoader", "inputs": {"model": [unet, 0], "lora": [train, 1],
                                                              "strength_model": 1.0}}
    native_save = sample_branch(920, ["910", 0], "native")

    started = time.monotonic()
    history = server.wait(server.queue(api))
    print(f"workflow (2 training steps, 4 sampling steps) took {time.monotonic() - started:.1f} s")
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]

    lora = server.base / "output" / "loras" / "it_lora.safetensors"
    assert lora.is_file() and _lora_steps(lora) == 2
    with safe_open(str(lora), framework="pt") as f:
        keys = list(f.keys())
    assert any(".single_transformer_blocks.0.attn.to_q." in k for k in keys)  # → rows of the fused linear1
    log = server.log_text()
    assert log.count("lora key not loaded") == 0 and "NOT LOADED" not in log
    assert history["outputs"][_node_id(api, "LossGraphNode")]["images"]

    def image(node_id: str) -> np.ndarray:
        return np.asarray(Image.open(server.output_file(history, node_id)), dtype=np.int16)

    with_lora, without = image(save), image(base_save)
    difference = np.abs(with_lora - without)
    print(f"LoRA vs base image: mean |Δ| {difference.mean():.3f}, max {difference.max()} (0–255)")
    assert with_lora.shape == without.shape and difference.max() > 0
    assert np.array_equal(image(native_save), with_lora)

    # A second run under the same name keeps the first file and writes the next free name; the cache node runs
    # again (new validation prompt) and reuses every file the first run encoded.
    before = lora.read_bytes()
    api[train]["inputs"]["seed"] = 7
    api[_node_id(api, "FluxLoraCache")]["inputs"]["validation_prompts"] = "ohwx, a red circle"
    history = server.wait(server.queue(training_only(api)))
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    assert lora.read_bytes() == before
    assert _lora_steps(server.base / "output" / "loras" / "it_lora_001.safetensors") == 2
    cache_lines = [line for line in server.log_text().splitlines() if "files reused" in line]
    # every file of the first run is reused: 4 latents, 4 captions and the empty caption
    assert len(cache_lines) == 2 and "9 files reused, 0 encoded" in cache_lines[-1], cache_lines


def test_cancel_keeps_a_checkpoint_and_resume_finishes_the_run(server, fx):
    steps = 5
    api = training_only(adapt(json.loads(WORKFLOW.read_text()), fx, steps=steps, output_name="resumed",
                              resume=True))
    run_dir = server.base / "output" / "flux_lora_training" / "checkpoints" / "resumed"
    prompt_id = server.queue(api)
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert time.monotonic() < deadline, f"no training step within 300 s:\n{server.log_tail()}"
        assert prompt_id not in server.request(f"/history/{prompt_id}"), "the run ended before it was cancelled"
        time.sleep(0.2)
    server.request("/interrupt", {})
    history = server.wait(prompt_id)
    assert history["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in history["status"]["messages"])
    (checkpoint,) = run_dir.glob("step_*.safetensors")
    stopped_at = int(checkpoint.stem.split("_")[1])
    assert 1 <= stopped_at < steps
    assert not (server.base / "output" / "loras" / "resumed.safetensors").exists()

    history = server.wait(server.queue(api))
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    assert re.search(rf"resumed from \S*step_0*{stopped_at}\.safetensors at step {stopped_at}", server.log_text())
    assert _lora_steps(server.base / "output" / "loras" / "resumed.safetensors") == steps
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows[-1]["step"] == steps


def test_shuffled_tags_are_encoded_by_comfyuis_clip_during_training(server, fx):
    """FLUX LoRA Options' shuffle_tags with FLUX LoRA Train's clip input: captions go through ComfyUI's own CLIP
    every step (its outputs are inference tensors made inside a node), and the run finishes."""
    api = training_only(adapt(json.loads(WORKFLOW.read_text()), fx, steps=3, output_name="shuffled"))
    train, cache = _node_id(api, "FluxLoraTrain"), _node_id(api, "FluxLoraCache")
    schema = server.request("/object_info/FluxLoraOptions")["FluxLoraOptions"]["input"]["required"]
    options = {name: (spec[1] or {}).get("default", spec[0][0] if isinstance(spec[0], list) else None)
               for name, spec in schema.items()}
    options.update(shuffle_tags=True, keep_tags=1, caption_dropout=0.3)
    api["950"] = {"class_type": "FluxLoraOptions", "inputs": options}
    api[train]["inputs"].update(options=["950", 0], clip=api[cache]["inputs"]["clip"])
    history = server.wait(server.queue(api))
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    lora = server.base / "output" / "loras" / "shuffled.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        settings = json.loads(f.metadata()["training_settings"])
    assert settings["shuffle_tags"] is True and settings["caption_dropout"] == 0.3
    log = server.log_text()
    assert "captions are encoded live" in log
    assert log.count("lora key not loaded") == 0  # the clip output: LoRA applied to MODEL and CLIP together


def test_installing_the_requirements_changes_nothing_comfyui_needs(tmp_path):
    """pip would install nothing that ComfyUI's requirements name, and the environment stays consistent."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [COMFYUI_PYTHON, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
         "-r", str(ROOT / "requirements.txt")], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    comfy_names = set()
    for line in (Path(COMFYUI_DIR) / "requirements.txt").read_text().splitlines():
        name = re.split(r"[<>=!~;\[ #]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
        if name:
            comfy_names.add(name)
    changed = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert not changed & comfy_names, f"would change ComfyUI's packages: {sorted(changed & comfy_names)}"
    check = subprocess.run([COMFYUI_PYTHON, "-m", "pip", "check"], capture_output=True, text=True, timeout=120,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
