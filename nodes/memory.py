"""FluxLoraMemory: a VRAM preset plus the user's own knobs → FLUX_LORA_MEMORY, with the peak-VRAM and host-RAM
estimates for the family and size of the MODEL given (FLUX.1-dev without one); and the Train node's host-RAM
preflight, which counts the base the same way: shared with ComfyUI, not a second copy."""

from __future__ import annotations

import re

import torch

from ..trainer_core.config import BASE_PRECISIONS, MemoryConfig
from . import comfy_bridge as bridge

CATEGORY = "FLUX LoRA"
FROM_PRESET = "from preset"
SWITCHES = {FROM_PRESET: None, "on": True, "off": False}  # widget label → MemoryConfig value (None: the preset's)
MAX_BLOCKS = 57  # FLUX.1 has 19 double + 38 single blocks (FLUX.2: klein-4B 25, klein-9B 32, dev 56)
COMFY_PREFIX = "diffusion_model."
_COMFY_NORM = re.compile(r"\.(query_norm|key_norm)\.weight$")  # ComfyUI ≥ 0.9 names the BFL RMSNorm `scale` `weight`
MAX_RESOLUTION = 4096


def _switch(tooltip: str):
    return (list(SWITCHES), {"default": FROM_PRESET, "tooltip": tooltip})


def overrides(base_precision, blocks_to_swap, gradient_checkpointing, offload_activations, compile_blocks,
              vram_budget_gb) -> dict:
    """The knobs the user set on the node ("from preset" / -1 leave the preset's value)."""
    chosen = {
        "base_precision": None if base_precision == FROM_PRESET else base_precision,
        "blocks_to_swap": None if blocks_to_swap < 0 else blocks_to_swap,
        "gradient_checkpointing": SWITCHES[gradient_checkpointing],
        "offload_activations": SWITCHES[offload_activations],
        "compile_blocks": SWITCHES[compile_blocks],
        "vram_budget_gb": vram_budget_gb or None,
    }
    return {k: v for k, v in chosen.items() if v is not None}


def model_facts(model, compute_dtype: str = "bf16") -> tuple[dict, str, int]:
    """(diffusers config, family name, bytes the Train node will copy) of a ComfyUI MODEL, read from the shapes,
    dtypes and patches of ComfyUI's own tensors (nothing is copied here).

    The Train node shares every weight but those it must change (see ``comfy_bridge._shared_weights``): weights a
    LoRA patches, ComfyUI's quantized tensor types, and weights stored in another dtype than ``compute_dtype``; the
    copies are in the compute dtype."""
    from ..trainer_core.memory.estimate import DTYPE_BYTES
    from ..trainer_core.models.family import detect_family

    weights = {key[len(COMFY_PREFIX):]: tensor for key, tensor in model.model_state_dict(COMFY_PREFIX).items()}
    shapes = {_COMFY_NORM.sub(r".\1.scale", key): torch.empty(tensor.shape, device="meta")
              for key, tensor in weights.items()}
    family = detect_family(shapes, "model")
    config = family.file_config(shapes)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute_dtype]
    patches = getattr(model, "patches", None) or {}
    copied = sum(tensor.numel() * DTYPE_BYTES[compute_dtype] for key, tensor in weights.items()
                 if patches.get(COMFY_PREFIX + key) or type(tensor) not in (torch.Tensor, torch.nn.Parameter)
                 or tensor.dtype != dtype)
    return config, family.name, copied


def plan(preset: str, knobs: dict, resolution: int = 1024, rank: int = 16, model=None):
    """(MemoryConfig, estimate text): the preset with ``knobs`` on top, refused if it exceeds vram_budget_gb.

    ``model``: the ComfyUI MODEL to be trained — the plan is that family's and size's (default FLUX.1-dev), and its
    host RAM counts the base as shared with ComfyUI (the Train node trains on the MODEL's own tensors).
    The config comes out as preset "none" with every knob written out: the trainer then uses it as is. Kept as
    "8gb" etc., the trainer would resolve the tier again and could not tell a knob the user set to the default
    value (e.g. offload_activations off) from one left unset, so the tier's value would come back.
    """
    import dataclasses

    from ..trainer_core.memory import (Workload, available_host_bytes, check_fits, estimate_host_ram,
                                       free_vram_bytes, resolve_preset)
    from ..trainer_core.memory.estimate import GiB

    model_config, family, copied = model_facts(model) if model is not None else (None, "FLUX.1-dev", 0)
    workload = Workload(model_config, resolution=resolution, rank=rank)
    mem = resolve_preset(preset, knobs, workload=workload)
    if mem.batch_size:
        workload = dataclasses.replace(workload, batch_size=mem.batch_size)
    estimate = workload.estimate(mem)
    if mem.vram_budget_gb:
        check_fits(estimate, mem, int(mem.vram_budget_gb * GiB), workload)
        room = f"fits the {mem.vram_budget_gb:g} GiB budget"
    else:
        free = free_vram_bytes()
        room = "no GPU found" if free is None else f"{free / GiB:.1f} GiB of VRAM free now"
    host = estimate_host_ram(estimate, model_config, mem, shared_base=True, copied_base_bytes=copied)
    host_text = f"{host.summary()}\n  {available_host_bytes() / GiB:.1f} GiB of host RAM available now"
    chosen = f"preset {preset}" + (f" → {mem.preset}" if mem.preset != preset else "")
    mem = dataclasses.replace(mem, preset="none")
    text = (f"{chosen}: {mem.base_precision} base, {mem.blocks_to_swap} blocks swapped (of "
            f"{estimate.blocks_total}), checkpointing {'on' if mem.gradient_checkpointing else 'off'}"
            + (", activations in host RAM" if mem.offload_activations else "")
            + (", compiled blocks" if mem.compile_blocks else "")
            + f" ({family}; {room}; rank {rank})\n{estimate.summary()}\n{host_text}")
    return mem, text


def host_preflight(model, mem: MemoryConfig | None, cache, lora_cfg, train_cfg, device) -> None:
    """The Train node's host-RAM check before it touches the MODEL: the plan for this run (``cache``: the
    trainer's LatentCache; its largest bucket and text length) with the base shared with ComfyUI — only the weights
    it must copy, the plan's conversions and its pinned blocks count — against the RAM available now; refused with
    the knob to change, as the CLI's check is."""
    from ..trainer_core import memory

    model_config, _, copied = model_facts(model, train_cfg.compute_dtype)
    workload = memory.Workload.for_training(model_config, cache.sizes, cache.text(0)[0].shape[0], lora_cfg,
                                            train_cfg)
    resolved, vram = memory.plan_memory(mem or MemoryConfig(), workload, device=device)
    memory.check_host_ram(memory.estimate_host_ram(vram, model_config, resolved, compute_dtype=train_cfg.compute_dtype,
                                                   shared_base=True, copied_base_bytes=copied), resolved)


class FluxLoraMemory:
    DESCRIPTION = ("Memory settings for FLUX LoRA Train: a VRAM preset (8gb … 80gb, or auto) with any knob set here "
                   "overriding it. Shows the estimated peak VRAM of a training step and the host RAM the plan "
                   "needs (swapped blocks, offloaded activations, copies and conversions beside ComfyUI's own "
                   "weights) for the connected MODEL's family and size; a vram_budget_gb the estimate exceeds is "
                   "refused with what to change.")
    CATEGORY = CATEGORY
    FUNCTION = "configure"
    RETURN_TYPES = ("FLUX_LORA_MEMORY", "STRING")
    RETURN_NAMES = ("memory", "estimate")
    OUTPUT_TOOLTIPS = (
        "The memory settings; connect to FLUX LoRA Train's memory input.",
        "The VRAM and host-RAM estimates as text (also shown under the node).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "preset": (list(MemoryConfig.PRESETS), {
                    "default": "auto",
                    "tooltip": "VRAM tier of your GPU (8gb … 80gb: fp8 base, block swap and checkpointing as "
                               "needed); auto picks the largest tier that fits the free VRAM (or vram_budget_gb); "
                               "none = everything on the GPU in the compute dtype."}),
                "base_precision": ([FROM_PRESET, *BASE_PRECISIONS], {
                    "default": FROM_PRESET,
                    "tooltip": "Storage of the frozen FLUX weights: fp8 halves them (little quality loss), nf4/int8 "
                               "quantise further (bitsandbytes), auto = the compute dtype."}),
                "blocks_to_swap": ("INT", {
                    "default": -1, "min": -1, "max": MAX_BLOCKS,
                    "tooltip": "Transformer blocks (of 57) kept in system RAM and streamed to the GPU when used: less "
                               "VRAM, slower steps; needs gradient checkpointing. -1 = the preset's value."}),
                "gradient_checkpointing": _switch(
                    "Recompute activations in the backward pass instead of keeping them: much less VRAM, about "
                    "30 % slower."),
                "offload_activations": _switch(
                    "Keep the checkpointed activations in system RAM until the backward pass (needs "
                    "checkpointing): for the smallest GPUs."),
                "compile_blocks": _switch(
                    "torch.compile each transformer block: faster steps after a slow first one (needs a working "
                    "Triton install)."),
                "vram_budget_gb": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                    "tooltip": "Most VRAM training may use, in GiB (0 = the free VRAM detected). auto sizes to it, "
                               "and a setting whose estimate exceeds it is refused."}),
            },
            "optional": {
                "resolution": ("INT", {"default": 1024, "min": 64, "max": MAX_RESOLUTION, "step": 16,
                                       "tooltip": "Largest training size in pixels, for the estimate (and auto)."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256,
                                 "tooltip": "LoRA rank, for the estimate (and auto); use the Train node's."}),
                "model": ("MODEL", {"tooltip": "The MODEL you will train (FLUX.1 or FLUX.2, e.g. from Load Diffusion "
                                               "Model): the presets and estimates are made for its family and size, "
                                               "its weights counted as shared with ComfyUI. Without it: FLUX.1-dev."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def configure(self, preset, base_precision, blocks_to_swap, gradient_checkpointing, offload_activations,
                  compile_blocks, vram_budget_gb, resolution=1024, rank=16, model=None, unique_id=None):
        knobs = overrides(base_precision, blocks_to_swap, gradient_checkpointing, offload_activations,
                          compile_blocks, vram_budget_gb)
        mem, text = plan(preset, knobs, resolution, rank, model)
        bridge.show_text(text, unique_id)
        return {"ui": {"text": [text]}, "result": (mem, text)}
