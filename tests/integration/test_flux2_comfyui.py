"""The FLUX.2 API workflows inside a real ComfyUI that knows FLUX.2 klein (0.9.2 or later): each one trains on its
MODEL, samples through ComfyUI's FLUX.2 nodes (EmptyFlux2LatentImage, Flux2Scheduler, CFGGuider / BasicGuider,
SamplerCustomAdvanced) an image that differs from the base model's, and saves a LoRA (and its kohya and comfy
exports) that ComfyUI's LoraLoader and LoraLoaderModelOnly load with no ``lora key not loaded``, each giving the
Train node's image. The klein edit workflow trains on (control → target) pairs and samples from a held-out control
through VAEEncode → ReferenceLatent (FLUX.2's "index" reference ids), the base model's edit of the same control
beside it.

Generated only for a ComfyUI whose source has FLUX.2 klein's text encoder (``klein_te``): nothing is collected for
an older release (CI fails on a skip), and everything skips, as the rest of this folder does, without COMFYUI_DIR.

What the tests substitute in the shipped graph (same node ids, same wiring), and why:
- UNETLoader loads a tiny FLUX.2 file (fixtures.flux2_state_dict: width 256, 1 + 1 blocks, BFL keys) instead of
  flux-2-klein-base-4b / flux2_dev_fp8mixed.
- CLIPLoader(type flux2, qwen_3_4b / mistral_3_small) becomes CLIPLoader(type stable_diffusion) with the tiny CLIP-L:
  ComfyUI builds the flux2 text encoder at full size whatever the file holds (Qwen3-4B ≈ 8 GB), which a CPU test
  cannot afford. The tiny FLUX.2 takes 768-wide text to match; the CLIP-L's pooled vector is ignored by FLUX.2.
- VAELoader(flux2-vae) becomes VAELoader("taef2"), ComfyUI's own tiny FLUX.2 VAE (128 channels at /16).
- The edit workflow's control folder and held-out control (LoadImage) become the FLUX.1 Kontext test's: each dataset
  image in grey, and a grey image the LoRA never saw (test_comfyui._edit_inputs).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))  # fixtures.py and comfy_server.py; tests/ is no package
fixtures = importlib.import_module("fixtures")
comfy_server = importlib.import_module("comfy_server")
test_comfyui = importlib.import_module("test_comfyui")
needed_by, node_inputs, saved_image = test_comfyui.needed_by, test_comfyui.node_inputs, test_comfyui.saved_image

ROOT = Path(__file__).resolve().parents[2]
FLUX2_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("flux2_*.json"))

pytestmark = pytest.mark.skipif(not comfy_server.configured(), reason=comfy_server.SKIP_REASON)


def comfyui_has_flux2_klein() -> bool:
    """Whether the ComfyUI under test can load FLUX.2 klein (its flux2 text encoder knows Qwen3: 0.9.2 or later).
    Without a ComfyUI configured the tests are collected, and skip with the folder's reason."""
    if not comfy_server.configured():
        return True
    source = Path(comfy_server.COMFYUI_DIR) / "comfy" / "text_encoders" / "flux.py"
    return source.is_file() and "def klein_te" in source.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    started = time.monotonic()
    built = fixtures.build_flux2_fixtures(tmp_path_factory.mktemp("comfyui_flux2"))
    print(f"\nFLUX.2 fixtures built in {time.monotonic() - started:.1f} s")
    return built


@pytest.fixture(scope="module")
def server(fx):
    with comfy_server.start_comfyui(fx.base) as srv:
        yield srv


def _ids(api: dict, class_type: str) -> list[str]:
    return [k for k, v in api.items() if v["class_type"] == class_type]


def adapt(api: dict, fx, variant: str, name: str) -> dict:
    """The shipped FLUX.2 workflow on the tiny fixtures (see the module docstring for what is substituted), at
    64 px, two training steps with the workflow's validation sample at the end, two sampling steps."""
    api = copy.deepcopy(api)
    controls, held_out = test_comfyui._edit_inputs(fx)
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = fx.models[variant]
        elif kind == "CLIPLoader":
            assert inputs["type"] == "flux2"
            inputs.update(clip_name=fx.clip, type="stable_diffusion")
        elif kind == "VAELoader":
            assert inputs["vae_name"] == "flux2-vae.safetensors"
            inputs["vae_name"] = fx.vae
        elif kind == "FluxLoraDataset":
            inputs.update(folder=fx.dataset, resolutions="64")
            if not inputs["control_folder"].startswith("(none"):
                inputs["control_folder"] = controls
        elif kind == "LoadImage":
            inputs["image"] = held_out
        elif kind == "FluxLoraTrain":
            inputs.update(rank=4, alpha=4.0, learning_rate=1e-2, timestep_sampling="sigmoid", steps=2,
                          checkpoint_every=0, sample_every=2, output_name=name)
        elif kind in ("EmptyFlux2LatentImage", "Flux2Scheduler"):
            inputs.update(width=64, height=64)
            if kind == "Flux2Scheduler":
                inputs["steps"] = 2
    return api


def sampling_branch(api: dict, sampler: str, first: int, model: list, prefix: str) -> str:
    """A copy of the workflow's guider → SamplerCustomAdvanced (``sampler``) → VAEDecode → SaveImage chain on
    ``model`` (same prompts, noise, schedule and latent), as nodes ``first``…; returns the SaveImage id."""
    guider = api[sampler]["inputs"]["guider"][0]
    (decode,) = [k for k in _ids(api, "VAEDecode") if api[k]["inputs"]["samples"] == [sampler, 0]]
    api[str(first)] = {"class_type": api[guider]["class_type"], "inputs": {**api[guider]["inputs"], "model": model}}
    api[str(first + 1)] = {"class_type": "SamplerCustomAdvanced",
                           "inputs": {**api[sampler]["inputs"], "guider": [str(first), 0]}}
    api[str(first + 2)] = {"class_type": "VAEDecode",
                           "inputs": {**api[decode]["inputs"], "samples": [str(first + 1), 0]}}
    api[str(first + 3)] = {"class_type": "SaveImage", "inputs": {"images": [str(first + 2), 0],
                                                                  "filename_prefix": prefix}}
    return str(first + 3)


def _generate():
    return FLUX2_WORKFLOWS if comfyui_has_flux2_klein() else []


if _generate():  # a ComfyUI without FLUX.2 klein collects nothing here (CI counts a skip as a failure)

    @pytest.mark.parametrize("workflow", _generate(), ids=lambda path: path.stem)
    def test_flux2_workflow_trains_saves_and_its_lora_samples_through_comfyuis_flux2_nodes(server, fx, workflow):
        variant = "klein" if "klein" in workflow.stem else "dev"
        name = f"wf_{workflow.stem}"
        api = adapt(json.loads(workflow.read_text()), fx, variant, name)
        (train,), (unet,), (sampler,) = _ids(api, "FluxLoraTrain"), _ids(api, "UNETLoader"), \
            _ids(api, "SamplerCustomAdvanced")
        guider = api[api[sampler]["inputs"]["guider"][0]]
        assert guider["class_type"] == ("CFGGuider" if variant == "klein" else "BasicGuider")
        assert guider["inputs"]["model"] == [train, 0]  # the trained MODEL straight into FLUX.2 sampling
        (save,) = [k for k in _ids(api, "SaveImage")]
        base_save = sampling_branch(api, sampler, 900, [unet, 0], f"{name}_base")
        edit = "edit" in workflow.stem
        if edit:  # the trained MODEL without the reference: the edit's ReferenceLatent reaches the model
            no_reference = sampling_branch(api, sampler, 910, [train, 0], f"{name}_no_reference")
            api["910"]["inputs"].update({side: api[api["910"]["inputs"][side][0]]["inputs"]["conditioning"]
                                         for side in ("positive", "negative")})
        api["940"] = {"class_type": "FluxLoraOptions",
                      "inputs": node_inputs(server, "FluxLoraOptions", export_kohya=True, export_comfy=True)}
        api[train]["inputs"]["options"] = ["940", 0]

        before = server.log_text().count("lora key not loaded")
        started = time.monotonic()
        history = server.wait(server.queue(api), timeout=1800)
        took = time.monotonic() - started
        assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
        print(f"{workflow.stem}: 2 training steps + validation sample + 2 sampled images in {took:.1f} s")

        lora = server.base / "output" / "loras" / f"{name}.safetensors"
        with safe_open(str(lora), framework="pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["steps"] == "2" and meta["base_model"].startswith(f"FLUX.2 {variant}")
        if edit:  # trained on the pairs; sampled from the held-out control through ReferenceLatent
            assert meta["reference_images"] == "1"
            assert re.search(r"4 targets paired with 1 control image\(s\) each", server.log_text())
            assert {api[guider["inputs"][side][0]]["class_type"] for side in ("positive", "negative")} == {
                "ReferenceLatent"}
        assert any("single_transformer_blocks.0.attn.to_qkv_mlp_proj" in k for k in keys), keys[:8]
        log = server.log_text()
        sharing = re.findall(r"(\d+) of (\d+) tensors shared, (\d+) copied", log)[-1]
        assert sharing[0] == sharing[1] and sharing[2] == "0"  # training used the MODEL's own FLUX.2 weights
        assert history["outputs"][_ids(api, "LossGraphNode")[0]]["images"]

        trained, base = saved_image(server, history, save), saved_image(server, history, base_save)
        difference = np.abs(trained - base)
        print(f"{workflow.stem}: LoRA vs base image mean |Δ| {difference.mean():.3f}, max {difference.max()}")
        assert trained.shape == base.shape and difference.max() > 0
        if edit:
            unreferenced = saved_image(server, history, no_reference)
            print(f"{workflow.stem}: edit vs the same MODEL without ReferenceLatent mean |Δ| "
                  f"{np.abs(trained - unreferenced).mean():.3f}")
            assert not np.array_equal(trained, unreferenced)

        # The saved files (default, kohya and comfy formats) through ComfyUI's LoRA loaders: every key loads, and
        # each gives the Train node's image.
        (models_loras := server.base / "models" / "loras").mkdir(parents=True, exist_ok=True)
        files = {fmt: f"{name}{suffix}.safetensors" for fmt, suffix in
                 (("default", ""), ("kohya", "_kohya"), ("comfy", "_comfy"))}
        for file in files.values():
            (models_loras / file).write_bytes((lora.parent / file).read_bytes())
        clip = api[_ids(api, "FluxLoraCache")[0]]["inputs"]["clip"]
        api["950"] = {"class_type": "LoraLoaderModelOnly", "inputs": node_inputs(
            server, "LoraLoaderModelOnly", model=[unet, 0], lora_name=files["default"], strength_model=1.0)}
        saves = {"LoraLoaderModelOnly": sampling_branch(api, sampler, 960, ["950", 0], f"{name}_model_only")}
        for i, (fmt, file) in enumerate(files.items()):
            loader = str(1000 + 10 * i)
            api[loader] = {"class_type": "LoraLoader", "inputs": node_inputs(
                server, "LoraLoader", model=[unet, 0], clip=clip, lora_name=file, strength_model=1.0,
                strength_clip=1.0)}
            saves[f"LoraLoader {fmt}"] = sampling_branch(api, sampler, int(loader) + 1, [loader, 0],
                                                         f"{name}_loader_{fmt}")
        history = server.wait(server.queue(needed_by(api, list(saves.values()))), timeout=1800)
        assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
        log = server.log_text()
        assert log.count("lora key not loaded") == before == 0 and "NOT LOADED" not in log
        for route, route_save in saves.items():
            assert np.array_equal(saved_image(server, history, route_save), trained), route
