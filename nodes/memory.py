"""FluxLoraMemory: a VRAM preset plus the user's own knobs → FLUX_LORA_MEMORY, with the peak-VRAM and host-RAM
estimates."""

from __future__ import annotations

from ..trainer_core.config import BASE_PRECISIONS, MemoryConfig
from . import comfy_bridge as bridge

CATEGORY = "FLUX LoRA"
FROM_PRESET = "from preset"
SWITCHES = {FROM_PRESET: None, "on": True, "off": False}  # widget label → MemoryConfig value (None: the preset's)
MAX_BLOCKS = 57  # FLUX.1 has 19 double + 38 single blocks
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


def plan(preset: str, knobs: dict, resolution: int = 1024, rank: int = 16):
    """(MemoryConfig, estimate text): the preset with ``knobs`` on top, refused if it exceeds vram_budget_gb.

    The config comes out as preset "none" with every knob written out: the trainer then uses it as is. Kept as
    "8gb" etc., the trainer would resolve the tier again and could not tell a knob the user set to the default
    value (e.g. offload_activations off) from one left unset, so the tier's value would come back.
    """
    import dataclasses

    from ..trainer_core.memory import (Workload, available_host_bytes, check_fits, estimate_host_ram,
                                       free_vram_bytes, resolve_preset)
    from ..trainer_core.memory.estimate import GiB

    workload = Workload(resolution=resolution, rank=rank)
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
    host = estimate_host_ram(estimate, None, mem)
    host_text = f"{host.summary()}\n  {available_host_bytes() / GiB:.1f} GiB of host RAM available now"
    chosen = f"preset {preset}" + (f" → {mem.preset}" if mem.preset != preset else "")
    mem = dataclasses.replace(mem, preset="none")
    text = (f"{chosen}: {mem.base_precision} base, {mem.blocks_to_swap} blocks swapped, checkpointing "
            f"{'on' if mem.gradient_checkpointing else 'off'}"
            + (", activations in host RAM" if mem.offload_activations else "")
            + (", compiled blocks" if mem.compile_blocks else "")
            + f" ({room}; rank {rank})\n{estimate.summary()}\n{host_text}")
    return mem, text


class FluxLoraMemory:
    DESCRIPTION = ("Memory settings for FLUX LoRA Train: a VRAM preset (8gb … 80gb, or auto) with any knob set here "
                   "overriding it. Shows the estimated peak VRAM of a training step and the host RAM the plan "
                   "needs (swapped blocks, offloaded activations, loading the base); a vram_budget_gb the "
                   "estimate exceeds is refused with what to change.")
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
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def configure(self, preset, base_precision, blocks_to_swap, gradient_checkpointing, offload_activations,
                  compile_blocks, vram_budget_gb, resolution=1024, rank=16, unique_id=None):
        knobs = overrides(base_precision, blocks_to_swap, gradient_checkpointing, offload_activations,
                          compile_blocks, vram_budget_gb)
        mem, text = plan(preset, knobs, resolution, rank)
        bridge.show_text(text, unique_id)
        return {"ui": {"text": [text]}, "result": (mem, text)}
