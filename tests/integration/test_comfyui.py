"""The pack inside a real ComfyUI: start it headless on a free loopback port with only this pack enabled
(comfy_server.py), build tiny model files its own loaders accept (fixtures.py), and run every shipped API workflow
over HTTP, load the LoRA files through ComfyUI's loaders, and run the optimizer resume tests under its torch.

Needs COMFYUI_DIR (a ComfyUI checkout, 0.8 or later) and COMFYUI_PYTHON (the Python ComfyUI runs with, with this
pack's requirements and pytest installed); skipped otherwise. ``make test-comfyui`` runs it; .ci/run runs it against
ComfyUI 0.8.0 and 0.33.0. Tens of minutes on 2 CPU cores: each training step moves a 545 M-parameter FLUX.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
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
ALL_API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
# FLUX.1 graphs (DualCLIPLoader → KSampler); the FLUX.2 ones run in test_flux2_comfyui.py, on releases with FLUX.2.
API_WORKFLOWS = [path for path in ALL_API_WORKFLOWS if not path.stem.startswith("flux2_")]
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


def adapt(api: dict, fx, tiny_settings: bool = True, **train: object) -> dict:
    """The shipped workflow on the tiny fixtures: same graph, fixture files, 64 px, one sampling step; with
    ``tiny_settings`` also rank 4, a high learning rate and no checkpoints or samples (else the workflow's own).

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
            if tiny_settings:
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
    return needed_by(api, [k for k, v in api.items() if v["class_type"] == "LossGraphNode"])


def needed_by(api: dict, outputs: list[str]) -> dict:
    """The nodes ``outputs`` need, themselves included."""
    keep, todo = set(), list(outputs)
    while todo:
        node_id = todo.pop()
        if node_id not in keep:
            keep.add(node_id)
            todo += [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
    return {k: v for k, v in api.items() if k in keep}


def _node_id(api: dict, class_type: str) -> str:
    return next(k for k, v in api.items() if v["class_type"] == class_type)


def first_sample_save(api: dict) -> str:
    """The SaveImage node of the workflow's first KSampler → VAEDecode → SaveImage chain."""
    sampler = min(k for k, v in api.items() if v["class_type"] == "KSampler")
    decode = next(k for k, v in api.items() if v["class_type"] == "VAEDecode" and v["inputs"]["samples"][0] == sampler)
    return next(k for k, v in api.items() if v["class_type"] == "SaveImage" and v["inputs"]["images"][0] == decode)


def sample_branch(api: dict, first: int, model: list, prefix: str, clip: list | None = None) -> str:
    """A copy of the first KSampler → VAEDecode → SaveImage chain on ``model`` (and its prompt encoded by ``clip``,
    else the workflow's conditioning), as nodes ``first``…; returns the SaveImage node id."""
    save = first_sample_save(api)
    decode = api[save]["inputs"]["images"][0]
    sampler = api[decode]["inputs"]["samples"][0]
    api[str(first)] = copy.deepcopy(api[sampler])
    api[str(first)]["inputs"]["model"] = model
    if clip is not None:  # CLIPTextEncode → FluxGuidance as the workflow's, on this CLIP
        guidance = api[sampler]["inputs"]["positive"][0]
        encode = api[guidance]["inputs"]["conditioning"][0]
        api[str(first + 3)] = {"class_type": "CLIPTextEncode", "inputs": {**api[encode]["inputs"], "clip": clip}}
        api[str(first + 4)] = {"class_type": "FluxGuidance",
                               "inputs": {**api[guidance]["inputs"], "conditioning": [str(first + 3), 0]}}
        api[str(first)]["inputs"]["positive"] = [str(first + 4), 0]
    api[str(first + 1)] = {"class_type": "VAEDecode", "inputs": {**api[decode]["inputs"], "samples": [str(first), 0]}}
    api[str(first + 2)] = {"class_type": "SaveImage", "inputs": {"images": [str(first + 1), 0],
                                                                  "filename_prefix": prefix}}
    return str(first + 2)


def node_inputs(server, class_type: str, **given) -> dict:
    """``given`` plus the live default of every other required input (releases add inputs: 0.33.0's
    LoraModelLoader has a required ``bypass``)."""
    required = server.request(f"/object_info/{class_type}")[class_type]["input"]["required"]
    inputs = {}
    for name, (kind, *options) in required.items():
        options = (options or [{}])[0]
        if "default" in options:
            inputs[name] = options["default"]
        elif isinstance(kind, list) and kind:
            inputs[name] = kind[0]
    return {**inputs, **given}


def saved_image(server, history: dict, node_id: str) -> np.ndarray:
    return np.asarray(Image.open(server.output_file(history, node_id)), dtype=np.int16)


def _lora_steps(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["steps"])


def test_comfyui_loads_the_pack_and_the_core_node_snapshot_is_current(server, fx):
    log = server.log_text()
    assert "IMPORT FAILED" not in log, server.log_tail()
    assert re.search(rf"seconds: .*{PACK_FOLDER}", log), "the pack is not in ComfyUI's import list"
    info = server.request("/object_info")
    assert {"FluxLoraDataset", "FluxLoraCache", "FluxLoraMemory", "FluxLoraOptions", "FluxLoraTrain"} <= set(info)
    snapshot = json.loads(SNAPSHOT.read_text())
    # The release the snapshot was taken from must match it exactly (so it is current); a later release must accept
    # what the snapshot describes (tests/test_workflows.py checks the shipped workflows against it offline): the same
    # inputs and types, every listed option, no new required input on a node the workflows use. New outputs, combo
    # options and optional settings are fine.
    exact = server.request("/system_stats")["system"]["comfyui_version"] == snapshot["comfyui_version"]
    used = {node["class_type"] for workflow in ALL_API_WORKFLOWS for node in json.loads(workflow.read_text()).values()}
    for name, spec in snapshot["nodes"].items():
        live = info[name]
        order = {k: v for k, v in live["input_order"].items() if k != "hidden"}
        if exact:
            assert live["output"] == spec["output"], name
            assert order == spec["input_order"], name
        else:
            assert live["output"][:len(spec["output"])] == spec["output"], name
            for section, names in spec["input_order"].items():
                assert set(names) <= set(order.get(section, [])), (name, section)
            if name in used:
                added = set(order.get("required", [])) - set(spec["input_order"].get("required", []))
                assert not added, f"{name}: new required inputs {sorted(added)} the shipped workflows do not set"
        for section, inputs in spec["input"].items():
            for input_name, (kind, *options) in inputs.items():
                live_kind, *live_options = live["input"][section][input_name]
                if kind == []:  # the user's files
                    assert isinstance(live_kind, list), (name, input_name)
                    continue
                live_options = {k: v for k, v in (live_options or [{}])[0].items() if k != "tooltip"}
                options = (options or [{}])[0]
                if exact:
                    assert live_kind == kind, (name, input_name)
                    assert live_options == options, (name, input_name)
                else:
                    assert set(kind) <= set(live_kind) if isinstance(kind, list) else live_kind == kind, \
                        (name, input_name)
                    if "options" in options:  # a V3 combo: later releases may add choices
                        assert set(options["options"]) <= set(live_options.get("options", [])), (name, input_name)
                    assert {k: live_options.get(k) for k in options if k != "options"} == \
                        {k: v for k, v in options.items() if k != "options"}, (name, input_name)


def test_training_workflow_runs_and_its_lora_reaches_ksampler(server, fx):
    api = adapt(json.loads(WORKFLOW.read_text()), fx, steps=2, output_name="it_lora")
    # The same sampling without the LoRA, to compare with: the base MODEL into a copy of the first KSampler.
    save = first_sample_save(api)
    unet, train = _node_id(api, "UNETLoader"), _node_id(api, "FluxLoraTrain")

    base_save = sample_branch(api, 900, [unet, 0], "base")
    # Training shares the MODEL's weights (re-homed out of inference mode in ComfyUI's module): the base MODEL must
    # sample bit-identically before and after. Before: the base branch on its own, first (ComfyUI then reuses its
    # output in the workflow below); after: a KSamplerAdvanced set to do exactly what KSampler does, so ComfyUI
    # samples again on the same, cached, MODEL object instead of reusing the KSampler's output.
    history = server.wait(server.queue(needed_by(api, [base_save])))
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    base_before = saved_image(server, history, base_save)
    # The LORA_MODEL output through ComfyUI's own LoraModelLoader must give the MODEL output's image.
    api["910"] = {"class_type": "LoraModelLoader",
                  "inputs": node_inputs(server, "LoraModelLoader", model=[unet, 0], lora=[train, 1], strength_model=1.0)}
    native_save = sample_branch(api, 920, ["910", 0], "native")

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
    sharing = re.search(r"(\d+) of (\d+) tensors shared, (\d+) copied", log)
    print(f"base weights: {sharing.group(0)}")
    assert sharing.group(1) == sharing.group(2) and sharing.group(3) == "0"  # fp32 MODEL, fp32 training on CPU
    assert history["outputs"][_node_id(api, "LossGraphNode")]["images"]

    def image(node_id: str) -> np.ndarray:
        return saved_image(server, history, node_id)

    base_after = sample_branch(api, 930, [unet, 0], "base_after")
    sampler = api["930"]["inputs"]
    assert sampler["denoise"] == 1.0
    api["930"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **{k: v for k, v in sampler.items() if k not in ("seed", "denoise")}, "noise_seed": sampler["seed"],
        "add_noise": "enable", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    after = server.wait(server.queue(needed_by(api, [base_after])))
    assert after["status"]["status_str"] == "success", json.dumps(after["status"])[:3000]
    assert np.array_equal(saved_image(server, after, base_after), base_before)

    with_lora, without = image(save), base_before  # the workflow reused the base branch: 0.8.0 lists no image
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
    options = node_inputs(server, "FluxLoraOptions", shuffle_tags=True, keep_tags=1, caption_dropout=0.3)
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


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=lambda path: path.stem)
def test_shipped_workflow_trains_checkpoints_resumes_and_samples(server, fx, workflow):
    """Each shipped API workflow as a user queues it, on the tiny fixtures with its own rank, optimizer and memory
    settings (the low-VRAM one: rank 16 and adamw8bit on the 3072-wide model, where bitsandbytes keeps 8-bit
    state): two steps (ComfyUI's LossGraphNode divides by the loss range, so one step fails there), the final
    checkpoint and validation sample (its checkpoint_every and sample_every exceed the steps), samples from its
    KSamplers, then a resume to a third step."""
    name = f"wf_{workflow.stem}"
    shipped = json.loads(workflow.read_text())
    api = adapt(shipped, fx, tiny_settings=False, steps=2, output_name=name)
    train = _node_id(api, "FluxLoraTrain")
    settings = shipped[train]["inputs"]
    assert settings["checkpoint_every"] > 1 and settings["sample_every"] > 1
    history = server.wait(server.queue(api), timeout=1800)
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]

    lora = server.base / "output" / "loras" / f"{name}.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata()
    assert (meta["steps"], meta["rank"]) == ("2", str(settings["rank"]))
    assert json.loads(meta["training_settings"])["optimizer"] == settings["optimizer"]
    run_dir = server.base / "output" / "flux_lora_training" / "checkpoints" / name
    checkpoint = max(run_dir.glob("step_*.safetensors"))
    assert int(checkpoint.stem.split("_")[1]) == 2
    if settings["optimizer"].endswith("8bit"):
        with safe_open(str(checkpoint), framework="pt") as f:
            state_dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.startswith("optimizer/")}
        assert "U8" in state_dtypes, f"no 8-bit optimizer state in {checkpoint.name}: {sorted(state_dtypes)}"
    saves = [k for k, v in api.items() if v["class_type"] == "SaveImage"]
    assert saves and all(server.output_file(history, k).is_file() for k in saves)
    assert history["outputs"][_node_id(api, "LossGraphNode")]["images"]
    log = server.log_text()
    assert log.count("lora key not loaded") == 0 and "NOT LOADED" not in log

    resume = training_only(api)
    resume[train]["inputs"].update(steps=3, resume=True)
    history = server.wait(server.queue(resume), timeout=1800)
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    assert re.search(rf"resumed from \S*{name}\S*step_0*2\.safetensors at step 2", server.log_text())
    assert max(int(ckpt.stem.split("_")[1]) for ckpt in run_dir.glob("step_*.safetensors")) == 3
    assert 3 in {_lora_steps(path) for path in lora.parent.glob(f"{name}*.safetensors")}


def test_the_lora_file_and_its_exports_load_through_comfyuis_lora_loaders(server, fx):
    """The LoRA file (and its kohya and comfy exports) from models/loras through LoraLoaderModelOnly and LoraLoader
    load every key and give the image of FLUX LoRA Train's own MODEL output (alpha ≠ rank, so alpha counts)."""
    api = adapt(json.loads(WORKFLOW.read_text()), fx, steps=2, alpha=2.0, output_name="loaders")
    train, cache = _node_id(api, "FluxLoraTrain"), _node_id(api, "FluxLoraCache")
    options = node_inputs(server, "FluxLoraOptions", export_kohya=True, export_comfy=True)
    api["960"] = {"class_type": "FluxLoraOptions", "inputs": options}
    api[train]["inputs"]["options"] = ["960", 0]
    history = server.wait(server.queue(training_only(api)), timeout=1800)
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    loras = server.base / "models" / "loras"
    files = {fmt: f"loaders{suffix}.safetensors" for fmt, suffix in
             (("default", ""), ("kohya", "_kohya"), ("comfy", "_comfy"))}
    for file in files.values():
        (loras / file).write_bytes((server.base / "output" / "loras" / file).read_bytes())

    unet, clip = _node_id(api, "UNETLoader"), api[cache]["inputs"]["clip"]
    api["970"] = {"class_type": "LoraLoaderModelOnly", "inputs": node_inputs(
        server, "LoraLoaderModelOnly", model=[unet, 0], lora_name=files["default"], strength_model=1.0)}
    saves = {"model only": sample_branch(api, 971, ["970", 0], "model_only")}
    for i, (fmt, file) in enumerate(files.items()):
        loader = str(980 + 10 * i)
        api[loader] = {"class_type": "LoraLoader", "inputs": node_inputs(
            server, "LoraLoader", model=[unet, 0], clip=clip, lora_name=file, strength_model=1.0, strength_clip=1.0)}
        saves[f"LoraLoader {fmt}"] = sample_branch(api, int(loader) + 1, [loader, 0], f"loader_{fmt}", [loader, 1])
    before = server.log_text().count("lora key not loaded")
    # FLUX LoRA Train's inputs are unchanged, so ComfyUI reuses its output; the base model's image shows the LoRA acts.
    base_save = sample_branch(api, 1020, [unet, 0], "loader_base")
    history = server.wait(server.queue(api), timeout=1800)
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    assert server.log_text().count("lora key not loaded") == before == 0
    trained = saved_image(server, history, first_sample_save(api))
    assert not np.array_equal(saved_image(server, history, base_save), trained)
    for route, save in saves.items():
        assert np.array_equal(saved_image(server, history, save), trained), route


def test_optimizer_checkpoints_resume_exactly_under_comfyuis_torch():
    """tests/test_optimizer_resume.py (every optimizer family, 8-bit sizes) run by ComfyUI's own Python and torch,
    which differ from the CPU suite's."""
    result = subprocess.run(
        # --import-mode=append: the checkout is a package, so pytest puts its parent folder on sys.path; behind
        # site-packages, a sibling folder there cannot shadow a library of the same name.
        [COMFYUI_PYTHON, "-m", "pytest", "tests/test_optimizer_resume.py", "-q", "-rA", "-p", "no:cacheprovider",
         "--import-mode=append"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, capture_output=True,
        text=True, timeout=1800, check=False)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"test_optimizer_resume.py under ComfyUI's Python: {summary}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert re.search(r"\d+ passed", summary) and not re.search(r"skipped|failed|error", summary), summary


def _pip_check(python: str) -> set[str]:
    result = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=120,
                            check=False)
    return {line.strip() for line in result.stdout.splitlines() if line.strip() and "No broken" not in line}


def test_installing_the_requirements_changes_nothing_comfyui_needs(tmp_path):
    """pip would install nothing that ComfyUI's requirements name, and the pack adds no pip check problem to those
    the environment had before it (ComfyUI 0.33.0's torchaudio pins another torch; .ci/comfyui_env saves them)."""
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
    baseline = Path(COMFYUI_PYTHON).parents[1] / "pip-check-before.txt"  # <venv>/bin/python → <venv>/
    before = ({line.strip() for line in baseline.read_text().splitlines() if line.strip() and "No broken" not in line}
              if baseline.is_file() else set())
    new = _pip_check(COMFYUI_PYTHON) - before
    assert not new, (f"pip check problems the pack's requirements added (baseline: "
                     f"{baseline if baseline.is_file() else 'none, so pip check must be clean'}): {sorted(new)}")
