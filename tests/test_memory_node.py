"""FluxLoraMemory without ComfyUI: preset + explicit knobs → MemoryConfig, the estimate text, refusals, and the
Train node handing the config to the trainer."""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
_test_nodes = importlib.import_module("test_nodes")  # imports the pack as ComfyUI does
PACK, load_pack = _test_nodes.PACK, _test_nodes.load_pack

KEEP = "from preset"


@pytest.fixture(scope="module")
def pack():
    load_pack()
    return SimpleNamespace(
        memory=importlib.import_module(f"{PACK}.nodes.memory"),
        train=importlib.import_module(f"{PACK}.nodes.train"),
        bridge=importlib.import_module(f"{PACK}.nodes.comfy_bridge"),
        engine=importlib.import_module(f"{PACK}.trainer_core.memory"),
        config=importlib.import_module(f"{PACK}.trainer_core.config"),
        errors=importlib.import_module(f"{PACK}.trainer_core.errors"),
    )


def configure(pack, preset="8gb", base_precision=KEEP, blocks_to_swap=-1, gradient_checkpointing=KEEP,
              offload_activations=KEEP, compile_blocks=KEEP, vram_budget_gb=0.0, **optional):
    return pack.memory.FluxLoraMemory().configure(preset, base_precision, blocks_to_swap, gradient_checkpointing,
                                                  offload_activations, compile_blocks, vram_budget_gb, **optional)


def test_schema_offers_every_preset_and_defaults_to_the_presets_values(pack):
    schema = pack.memory.FluxLoraMemory.INPUT_TYPES()
    required = schema["required"]
    assert required["preset"][0] == list(pack.config.MemoryConfig.PRESETS)
    assert required["base_precision"][0] == [KEEP, *pack.config.BASE_PRECISIONS]
    assert required["blocks_to_swap"][1]["default"] == -1
    knobs = {k: v[1]["default"] for k, v in required.items() if k != "preset"}
    assert pack.memory.overrides(**knobs) == {}  # untouched widgets leave every knob to the preset
    assert set(schema["optional"]) == {"resolution", "rank", "model"}
    assert pack.memory.FluxLoraMemory.RETURN_TYPES == ("FLUX_LORA_MEMORY", "STRING")


def concrete(pack, preset, overrides=None):
    """resolve_preset's knobs, written out as the node passes them on (preset "none": used as is)."""
    return dataclasses.replace(pack.engine.resolve_preset(preset, overrides), preset="none")


def test_8gb_preset_gives_the_presets_config(pack):
    out = configure(pack, "8gb")
    mem, text = out["result"]
    assert mem == concrete(pack, "8gb")
    assert out["ui"] == {"text": [text]}
    assert pack.engine.plan_memory(mem, device="cpu")[0] == mem  # the trainer's planning keeps it as is


def test_knobs_set_on_the_node_win_over_the_preset(pack):
    mem, _ = configure(pack, "8gb", blocks_to_swap=20, base_precision="nf4", offload_activations="off")["result"]
    assert mem == concrete(pack, "8gb", {"blocks_to_swap": 20, "base_precision": "nf4", "offload_activations": False})
    assert (mem.blocks_to_swap, mem.base_precision, mem.offload_activations) == (20, "nf4", False)
    # a knob set back to MemoryConfig's default survives the trainer's own planning
    assert pack.engine.plan_memory(mem, device="cpu")[0].offload_activations is False
    assert mem.gradient_checkpointing and mem.optimizer == "adamw8bit"  # the rest is still the 8gb tier's
    mem, _ = configure(pack, "80gb", gradient_checkpointing="on", compile_blocks="off")["result"]
    assert (mem.gradient_checkpointing, mem.compile_blocks, mem.base_precision) == (True, False, "bf16")


def test_estimate_follows_resolution_and_is_shown_under_the_node(pack, monkeypatch):
    shown = []
    server = ModuleType("server")
    server.PromptServer = SimpleNamespace(instance=SimpleNamespace(
        send_progress_text=lambda text, node_id: shown.append((node_id, text))))
    monkeypatch.setitem(sys.modules, "server", server)
    _, small = configure(pack, "8gb", resolution=512, unique_id="7")["result"]
    _, large = configure(pack, "8gb", resolution=1024)["result"]
    assert "512×512" in small and "GiB" in small and "45 blocks swapped" in small
    peak = [float(re.search(r"([\d.]+) GiB peak", text).group(1)) for text in (small, large)]
    assert peak[0] < peak[1] < 8  # the 8gb tier fits 8 GB at 1024 px too
    assert shown == [("7", small)]


def test_auto_sizes_to_the_budget(pack):
    small, _ = configure(pack, "auto", vram_budget_gb=10.0)["result"]
    large, text = configure(pack, "auto", vram_budget_gb=80.0)["result"]
    assert small == concrete(pack, "8gb", {"vram_budget_gb": 10.0})
    tier = re.match(r"preset auto → (\w+):", text).group(1)
    assert tier in ("48gb", "80gb") and large == concrete(pack, tier, {"vram_budget_gb": 80.0})
    assert "fits the 80 GiB budget" in text


def test_a_budget_the_estimate_exceeds_is_refused_with_the_fix(pack):
    with pytest.raises(pack.errors.TrainerInputError, match=r"needs about .* GiB .* 2\.0 GiB is available") as info:
        configure(pack, "24gb", vram_budget_gb=2.0)
    assert "resolution" in str(info.value)  # even the smallest tier does not fit: what else to change
    with pytest.raises(pack.errors.TrainerInputError, match='memory.preset = "8gb"'):
        configure(pack, "24gb", vram_budget_gb=8.0)


def test_contradicting_knobs_are_refused(pack):
    with pytest.raises(pack.errors.TrainerInputError, match="gradient_checkpointing"):
        configure(pack, "8gb", gradient_checkpointing="off")  # 45 swapped blocks need checkpointing


def test_train_node_hands_the_memory_config_to_the_trainer(pack, monkeypatch):
    """The FLUX_LORA_MEMORY input reaches train_lora(mem_cfg=...) unchanged."""
    class Interrupted(Exception):
        pass

    comfy = ModuleType("comfy")
    comfy.model_management = ModuleType("comfy.model_management")
    comfy.model_management.InterruptProcessingException = Interrupted
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
    bridge = pack.bridge
    flux1 = importlib.import_module(f"{PACK}.trainer_core.models.family").FLUX1
    for name, value in {"model_family": lambda model: flux1, "flux_variant": lambda model: "dev",
                        "training_device": lambda: "cpu",
                        "compute_dtype_name": lambda device: "fp32", "comfy_folders": lambda: (Path("in"),
                                                                                              Path("out")),
                        "comfy_progress": lambda node_id: (lambda total: None, lambda text: None, lambda: None),
                        "free_vram": lambda: None, "release": lambda: None,
                        "flux_weight_precision": lambda model: None,
                        "flux_state_dict": lambda model, dtype, storage=None: {}}.items():
        monkeypatch.setattr(bridge, name, value)
    monkeypatch.setattr(importlib.import_module(f"{PACK}.trainer_core.models.flux"), "load_flux_transformer",
                        lambda *args, **kwargs: object())
    received = {}

    def fake_train_lora(transformer, cache, **kwargs):
        received.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(importlib.import_module(f"{PACK}.trainer_core.train"), "train_lora", fake_train_lora)
    checked = []  # the host-RAM preflight (its own test below) sees the same config first
    monkeypatch.setattr(pack.memory, "host_preflight", lambda model, mem, *args: checked.append(mem))
    mem, _ = configure(pack, "12gb")["result"]
    data = importlib.import_module(f"{PACK}.nodes.cache").TrainingData([object()], trigger_word="ohwx",
                                                                        resolutions=[512])  # one cached item
    with pytest.raises(RuntimeError, match="stop here"):
        pack.train.FluxLoraTrain().train(object(), data, 4, 4.0, 1e-4, 10, "adamw", "flux_shift", 1.0, 0, 0,
                                         "memory_test", False, memory=mem)
    assert received["mem_cfg"] is mem and checked == [mem]


def test_the_node_shows_host_ram_beside_vram(pack):
    _, text = configure(pack, "8gb")["result"]
    host = text[text.index("host RAM estimate"):]
    assert "swapped blocks pinned" in host and "offloaded activations" in host and "available now" in host
    pinned = float(re.search(r"([\d.]+) GiB swapped blocks pinned", host).group(1))
    assert 8 < pinned < 10  # 45 of FLUX.1-dev's 57 blocks in fp8
    _, roomy = configure(pack, "24gb")["result"]
    # the Train node shares ComfyUI's MODEL: without swapped blocks the base costs no host RAM of its own
    assert "base copy while training: shared with ComfyUI's MODEL (no copy)" in roomy


# ----- the MODEL's family, and its base shared with ComfyUI -----

def comfy_model(pack, name: str, **changes):
    """A stand-in for ComfyUI's MODEL of a shipped FLUX.2 transformer (or FLUX.1-dev): its full-size weights as meta
    tensors under ComfyUI's module names (BFL names, the q/k norms holding `weight`)."""
    import torch

    flux, flux2 = (importlib.import_module(f"{PACK}.trainer_core.models.{m}") for m in ("flux", "flux2"))
    family = importlib.import_module(f"{PACK}.trainer_core.models.family")
    config = dict(flux.flux_config(name) if name.startswith("flux1") else flux2.flux2_config(name), **changes)
    with torch.device("meta"):
        sd = family.detect_family(config).model_class()(**{k: v for k, v in config.items()
                                                           if not k.startswith("_")}).to(torch.bfloat16).state_dict()
    bfl = (flux if name.startswith("flux1") else flux2).diffusers_to_bfl(sd)
    weights = {k[:-len("scale")] + "weight" if k.endswith("_norm.scale") else k: v for k, v in bfl.items()}
    return _test_nodes.FakeModelPatcher(weights, image_model="flux" if name.startswith("flux1") else "flux2"), config


def test_the_node_plans_for_the_family_and_size_of_its_model(pack):
    model, config = comfy_model(pack, "flux2-klein-4b")
    mem, text = configure(pack, "8gb", model=model)["result"]
    workload = pack.engine.Workload(config, 1024)
    expected = pack.engine.resolve_preset("8gb", workload=workload)
    assert mem == dataclasses.replace(expected, preset="none")  # klein-4B's 8gb tier, not FLUX.1's
    assert "FLUX.2" in text and "0 blocks swapped (of 25)" in text
    peak = float(re.search(r"([\d.]+) GiB peak", text).group(1))
    assert peak == round(workload.estimate(expected).total_gib, 2)
    _, flux1 = configure(pack, "8gb")["result"]
    assert "FLUX.1" in flux1 and "45 blocks swapped (of 57)" in flux1
    _, dev = configure(pack, "24gb", model=comfy_model(pack, "flux2-dev")[0])["result"]
    assert "blocks swapped (of 56)" in dev and "0 blocks swapped" not in dev


def test_host_ram_counts_the_base_as_shared_with_comfyui(pack):
    """The Train node trains on the MODEL's own tensors: its host RAM is the plan's conversion and pinned blocks,
    never a second base; only the weights it must copy (LoRA-patched, other dtype) count as copies."""
    import torch

    model, config = comfy_model(pack, "flux2-klein-9b")
    _, text = configure(pack, "24gb", model=model)["result"]  # fp8, nothing swapped
    host = text[text.index("host RAM estimate"):]
    assert "shared with ComfyUI's MODEL (no copy)" in host and "preparing the base" in host
    shown = float(re.search(r"preparing the base[^:]*: ([\d.]+) GiB", host).group(1))
    cli = pack.engine.estimate_host_ram(pack.engine.Workload(config).estimate(
        pack.engine.resolve_preset("24gb", workload=pack.engine.Workload(config))), config,
        pack.engine.resolve_preset("24gb", workload=pack.engine.Workload(config)))
    assert shown < cli.load_peak / 2**30 - 0.5  # the fp8 blocks only: no bf16 base, no outside weights
    facts = pack.memory.model_facts
    assert facts(model)[2] == 0
    key = "diffusion_model.double_blocks.0.img_mlp.0.weight"
    weight = model.sd[key]
    model.patches = {key: [(1.0, None)]}  # a LoRA applied to the MODEL: the merged weight is a copy
    assert facts(model)[2] == weight.numel() * 2
    model.patches = {}
    with torch.inference_mode():  # an fp8 weight (Load Diffusion Model's weight_dtype): copied into bf16
        model.model.get_submodule("diffusion_model.double_blocks.0.img_mlp.0").weight = torch.nn.Parameter(
            weight.to(torch.float8_e4m3fn), requires_grad=False)
    assert facts(model)[2] == weight.numel() * 2


def test_train_node_preflight_counts_the_shared_base(pack, monkeypatch):
    """The Train node's host-RAM check before it touches the MODEL: klein-4B's bf16 plan needs no host RAM beyond
    the process (refused only below that), where a CLI run would need the whole base."""
    import torch

    model, config = comfy_model(pack, "flux2-klein-4b")
    cache = SimpleNamespace(sizes=[(1024, 1024)], text=lambda i: (torch.zeros(512, 7680), torch.zeros(0)))
    lora_cfg, train_cfg = pack.train.configs(16, 16.0, 1e-4, 10, "adamw", "sigmoid", 1.0, 0, 0, "bf16")
    mem = pack.config.MemoryConfig(preset="24gb")  # klein-4B's: bf16 base, nothing swapped
    presets = importlib.import_module(f"{PACK}.trainer_core.memory.presets")
    monkeypatch.setattr(presets, "available_host_bytes", lambda: 2 * 2**30)
    pack.memory.host_preflight(model, mem, cache, lora_cfg, train_cfg, torch.device("cuda"))
    monkeypatch.setattr(presets, "available_host_bytes", lambda: 2**29)
    with pytest.raises(pack.errors.TrainerInputError, match="host RAM"):
        pack.memory.host_preflight(model, mem, cache, lora_cfg, train_cfg, torch.device("cuda"))
