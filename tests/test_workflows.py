"""Every shipped workflow is loadable and runnable: node types exist, links are consistent, widget values are
valid, and each API-format twin is exactly what its UI workflow converts to.

Core node specs come from tests/integration/comfyui_core_nodes.json (a snapshot of a stock ComfyUI's
/object_info, checked against a live server by the integration suite); this pack's from its classes.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
_test_nodes = importlib.import_module("test_nodes")  # imports the pack as ComfyUI does
PACK, load_pack = _test_nodes.PACK, _test_nodes.load_pack

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
CORE = json.loads((Path(__file__).parent / "integration" / "comfyui_core_nodes.json").read_text())["nodes"]
VIRTUAL = {"MarkdownNote", "Note"}  # frontend-only nodes: never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def _pack_specs() -> dict[str, dict]:
    load_pack()
    nodes = importlib.import_module(f"{PACK}.nodes")
    specs = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        schema = cls.INPUT_TYPES()
        specs[name] = {"input": {k: v for k, v in schema.items() if k != "hidden"},
                       "input_order": {k: list(v) for k, v in schema.items() if k != "hidden"},
                       "output": list(cls.RETURN_TYPES), "output_name": list(cls.RETURN_NAMES)}
    # The folder list is the user's input folder: any name is valid in a shipped workflow.
    specs["FluxLoraDataset"]["input"]["required"]["folder"] = ([], {})
    specs["FluxLoraDataset"]["input"]["optional"]["control_folder"] = ([], {})
    return specs


SPECS = {**CORE, **_pack_specs()}


def ui_workflows() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def api_workflows() -> list[Path]:
    return sorted((WORKFLOWS / "api").glob("*.json"))


def _inputs(node_type: str):
    """(name, spec, required) in the order the frontend lays out widgets and sockets."""
    spec = SPECS[node_type]
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            yield name, spec["input"][section][name], section == "required"


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES or spec[0] == "COMBO"


def _has_control_widget(name: str, spec) -> bool:
    """The frontend adds a 'control after generate' value behind seed-like INT widgets."""
    options = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")) is not False


def widget_values(node: dict) -> dict:
    """A UI node's widgets_values by input name (control-after-generate values dropped)."""
    values = list(node.get("widgets_values") or [])
    named, i = {}, 0
    for name, spec, _ in _inputs(node["type"]):
        if not _is_widget(spec):
            continue
        assert i < len(values), f"node {node['id']} ({node['type']}): no value for widget '{name}'"
        named[name] = values[i]
        i += 2 if _has_control_widget(name, spec) else 1
    assert i == len(values), f"node {node['id']} ({node['type']}): {len(values)} widget values, expected {i}"
    return named


def ui_to_api(ui: dict) -> dict:
    """What the frontend queues for a UI workflow (its 'Export (API)'), for the features these workflows use."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL or node.get("mode", 0) != 0:
            continue
        inputs = dict(widget_values(node))
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def check_widget(where: str, name: str, spec, value) -> None:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if kind == "COMBO":  # the V3 nodes' combo: its choices under "options"
        kind = options["options"]
    if isinstance(kind, list):
        if kind:
            assert value in kind, f"{where}.{name}: {value!r} is not one of {kind}"
        else:  # a file or folder the user provides
            assert isinstance(value, str) and value.strip(), f"{where}.{name}: needs a name, got {value!r}"
        return
    if kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}.{name}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}.{name}: {value!r} is not a string"
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}.{name}: {value!r}"
        assert kind != "INT" or float(value).is_integer(), f"{where}.{name}: {value!r} is not whole"
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}.{name}: {value} out of range"


def check_pack_settings(node_type: str, values: dict) -> None:
    """Our nodes' widget values also pass trainer_core's own validation."""
    load_pack()
    if node_type == "FluxLoraDataset":
        importlib.import_module(f"{PACK}.nodes.dataset").parse_resolutions(values["resolutions"])
    elif node_type == "FluxLoraTrain":
        train = importlib.import_module(f"{PACK}.nodes.train")
        fileio = importlib.import_module(f"{PACK}.trainer_core.fileio")
        keys = ("rank", "alpha", "learning_rate", "steps", "optimizer", "timestep_sampling", "guidance", "seed",
                "checkpoint_every")
        train.configs(**{k: values[k] for k in keys}, compute_dtype="bf16")
        fileio.safe_output_name(values["output_name"])
    elif node_type == "FluxLoraMemory":
        memory = importlib.import_module(f"{PACK}.nodes.memory")
        knobs = memory.overrides(*(values[k] for k in ("base_precision", "blocks_to_swap", "gradient_checkpointing",
                                                       "offload_activations", "compile_blocks", "vram_budget_gb")))
        memory.plan(values["preset"], knobs, values["resolution"], values["rank"])


def _socket_type(node_type: str, name: str) -> str:
    for input_name, spec, _ in _inputs(node_type):
        if input_name == name:
            return spec[0]
    raise AssertionError(f"{node_type} has no input '{name}'")


def test_the_training_workflows_and_their_api_twins_ship():
    assert {WORKFLOWS / "flux_lora_train.json", WORKFLOWS / "flux_lora_train_lowvram.json",
            WORKFLOWS / "flux2_klein_lora_train.json", WORKFLOWS / "flux2_dev_lora_train.json",
            WORKFLOWS / "flux_kontext_lora_train.json", WORKFLOWS / "flux2_klein_edit_lora_train.json"
            } <= set(ui_workflows())
    assert {p.name for p in api_workflows()} == {p.name for p in ui_workflows()}


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.name)
def test_ui_workflow_is_consistent(path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    nodes = {node["id"]: node for node in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    assert len(nodes) == len(ui["nodes"]) and len(links) == len(ui["links"]), "duplicate ids"
    assert ui["last_node_id"] >= max(nodes) and ui["last_link_id"] >= max(link[0] for link in ui["links"])
    for node in nodes.values():
        assert node["type"] in SPECS or node["type"] in VIRTUAL, f"unknown node type {node['type']}"
    for link_id, source, source_slot, target, target_slot, kind in ui["links"]:
        out = nodes[source]["outputs"][source_slot]
        inp = nodes[target]["inputs"][target_slot]
        assert link_id in (out["links"] or []) and inp["link"] == link_id, f"link {link_id} is not mirrored"
        assert kind == out["type"] == SPECS[nodes[source]["type"]]["output"][source_slot], f"link {link_id}"
        assert _socket_type(nodes[target]["type"], inp["name"]) in (kind, "*"), f"link {link_id}: type {kind}"
    for node in nodes.values():
        if node["type"] in VIRTUAL:
            continue
        where = f"node {node['id']} ({node['type']})"
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for index, slot in enumerate(node.get("outputs", [])):
            for link_id in slot["links"] or []:
                assert links[link_id][1:3] == [node["id"], index], f"{where}: output link {link_id} dangles"
        values = widget_values(node)
        for name, spec, required in _inputs(node["type"]):
            if _is_widget(spec):
                check_widget(where, name, spec, values[name])
            else:
                assert name in linked or not required, f"{where}: required input '{name}' is not connected"
        check_pack_settings(node["type"], values)


@pytest.mark.parametrize("path", api_workflows(), ids=lambda p: p.name)
def test_api_twin_matches_its_ui_workflow(path):
    api = json.loads(path.read_text(encoding="utf-8"))
    ui = json.loads((WORKFLOWS / path.name).read_text(encoding="utf-8"))
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == ui_to_api(ui)
    for node in api.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source = api[value[0]]
                assert SPECS[source["class_type"]]["output"][value[1]] == _socket_type(node["class_type"], name)


@pytest.mark.parametrize("name,t5", [("flux_lora_train.json", "t5xxl_fp16.safetensors"),
                                     ("flux_lora_train_lowvram.json", "t5xxl_fp8_e4m3fn.safetensors")])
def test_training_workflow_wires_training_into_sampling(name, t5):
    """The graph the issue describes: loaders → cache/train, trained MODEL → KSamplers with the trigger word,
    loss → LossGraphNode, standard FLUX.1 file names."""
    api = json.loads((WORKFLOWS / "api" / name).read_text(encoding="utf-8"))
    by_type: dict[str, list[str]] = {}
    for node_id, node in api.items():
        by_type.setdefault(node["class_type"], []).append(node_id)

    def source_type(node_id: str, name: str) -> str:
        return api[api[node_id]["inputs"][name][0]]["class_type"]

    (train,) = by_type["FluxLoraTrain"]
    (cache,) = by_type["FluxLoraCache"]
    assert source_type(train, "model") == "UNETLoader" and source_type(train, "cache") == "FluxLoraCache"
    assert [source_type(cache, k) for k in ("dataset", "vae", "clip")] == ["FluxLoraDataset", "VAELoader",
                                                                            "DualCLIPLoader"]
    trigger = api[by_type["FluxLoraDataset"][0]]["inputs"]["trigger_word"]
    samplers = by_type["KSampler"]
    assert len(samplers) >= 2
    for sampler in samplers:
        assert api[sampler]["inputs"]["model"] == [train, 0]
        conditioning = api[sampler]["inputs"]["positive"][0]
        while api[conditioning]["class_type"] != "CLIPTextEncode":
            conditioning = api[conditioning]["inputs"]["conditioning"][0]
        assert trigger in api[conditioning]["inputs"]["text"]
        decoders = [n for n in by_type["VAEDecode"] if api[n]["inputs"]["samples"] == [sampler, 0]]
        assert any(api[s]["inputs"]["images"] == [decoders[0], 0] for s in by_type["SaveImage"])
    assert api[by_type["LossGraphNode"][0]]["inputs"]["loss"] == [train, 2]
    files = {api[n]["inputs"][k] for n in api for k in ("unet_name", "clip_name1", "clip_name2", "vae_name")
             if k in api[n]["inputs"]}
    assert files == {"flux1-dev.safetensors", "clip_l.safetensors", t5, "ae.safetensors"}
    assert api[by_type["DualCLIPLoader"][0]]["inputs"]["type"] == "flux"


@pytest.mark.parametrize("name,files", [
    ("flux2_klein_lora_train.json", {"flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors"}),
    ("flux2_dev_lora_train.json", {"flux2_dev_fp8mixed.safetensors", "mistral_3_small_flux2_fp8.safetensors"})])
def test_flux2_workflow_wires_training_into_comfyuis_flux2_sampling(name, files):
    """ComfyUI's standard FLUX.2 files (klein: the base model, which LoRAs are trained on), the flux2 text encoder
    into the cache, and the trained MODEL straight into ComfyUI's FLUX.2 sampling: klein base with real CFG against
    a negative prompt, dev with FluxGuidance; Flux2Scheduler and EmptyFlux2LatentImage at the same size."""
    api = json.loads((WORKFLOWS / "api" / name).read_text(encoding="utf-8"))
    by_type: dict[str, list[str]] = {}
    for node_id, node in api.items():
        by_type.setdefault(node["class_type"], []).append(node_id)

    def source(node_id: str, input_name: str) -> dict:
        return api[api[node_id]["inputs"][input_name][0]]

    (train,), (cache,) = by_type["FluxLoraTrain"], by_type["FluxLoraCache"]
    (sampler,) = by_type["SamplerCustomAdvanced"]
    assert source(train, "model")["class_type"] == "UNETLoader"
    assert source(cache, "clip")["class_type"] == "CLIPLoader" and source(cache, "clip")["inputs"]["type"] == "flux2"
    assert source(cache, "vae")["inputs"]["vae_name"] == "flux2-vae.safetensors"
    file_names = {v for n in api.values() for k, v in n["inputs"].items() if k in ("unet_name", "clip_name")}
    assert file_names == files
    guider = source(sampler, "guider")
    assert guider["inputs"]["model"] == [train, 0]
    trigger = api[by_type["FluxLoraDataset"][0]]["inputs"]["trigger_word"]
    if "klein" in name:
        assert guider["class_type"] == "CFGGuider" and guider["inputs"]["cfg"] > 1
        positive, negative = (api[guider["inputs"][k][0]] for k in ("positive", "negative"))
        assert trigger in positive["inputs"]["text"] and trigger not in negative["inputs"]["text"]
    else:
        assert guider["class_type"] == "BasicGuider"
        guidance = api[guider["inputs"]["conditioning"][0]]
        assert guidance["class_type"] == "FluxGuidance" and trigger in api[guidance["inputs"]["conditioning"][0]][
            "inputs"]["text"]
    latent, schedule = source(sampler, "latent_image"), source(sampler, "sigmas")
    assert latent["class_type"] == "EmptyFlux2LatentImage" and schedule["class_type"] == "Flux2Scheduler"
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (schedule["inputs"]["width"],
                                                                       schedule["inputs"]["height"])
    (decode,) = [n for n in by_type["VAEDecode"] if api[n]["inputs"]["samples"] == [sampler, 0]]
    assert any(api[s]["inputs"]["images"] == [decode, 0] for s in by_type["SaveImage"])
    assert api[by_type["LossGraphNode"][0]]["inputs"]["loss"] == [train, 2]


def test_low_vram_workflow_trains_with_the_8gb_preset_at_512():
    api = json.loads((WORKFLOWS / "api" / "flux_lora_train_lowvram.json").read_text(encoding="utf-8"))
    (train,) = [n for n in api.values() if n["class_type"] == "FluxLoraTrain"]
    memory = api[train["inputs"]["memory"][0]]
    assert memory["class_type"] == "FluxLoraMemory" and memory["inputs"]["preset"] == "8gb"
    assert memory["inputs"]["resolution"] == 512 and memory["inputs"]["rank"] == train["inputs"]["rank"]
    (dataset,) = [n for n in api.values() if n["class_type"] == "FluxLoraDataset"]
    assert dataset["inputs"]["resolutions"] == "512"
    nodes = importlib.import_module(f"{PACK}.nodes.memory")
    mem, text = nodes.FluxLoraMemory().configure(**memory["inputs"])["result"]
    assert (mem.base_precision, mem.blocks_to_swap, mem.offload_activations) == ("fp8", 45, True)
    assert train["inputs"]["optimizer"] == mem.optimizer  # the Train node shows what the preset trains with
    assert float(re.search(r"([\d.]+) GiB peak", text).group(1)) < 8
