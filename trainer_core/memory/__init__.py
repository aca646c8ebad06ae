"""Memory engine: how the frozen base is stored, placed and streamed while a LoRA trains.

The trainer calls two functions in this order:
``prepare_base`` (precision of the frozen weights, before the adapter exists), then — after
``lora.add_lora`` — ``prepare_training`` (LoRA dtype, fp8 storage, device placement, block swap, activation
checkpointing/offload, compile), and ``MemoryHandle.close()`` at the end.

Before training, ``plan_memory`` (or ``resolve_preset`` + ``estimate_vram``) turns a preset into concrete
knobs and checks that they fit the VRAM available; ``estimate_host_ram`` + ``check_host_ram`` do the same
for host RAM before the base is loaded.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import MemoryConfig
from .activations import ActivationOffloader, checkpoint_fn
from .estimate import HostRamEstimate, VramEstimate, estimate_host_ram, estimate_vram, flux_forward_flops
from .precision import (
    BLOCK_LISTS,
    apply_base_precision,
    apply_storage_casts,
    lora_compute_in_input_dtype,
    place_module,
    transformer_blocks,
)
from .presets import (
    PRESET_TABLE,
    TimeEstimate,
    Workload,
    available_host_bytes,
    check_fits,
    check_host_ram,
    effective_train_config,
    explicit_overrides,
    free_vram_bytes,
    plan_memory,
    resolve_preset,
    time_estimate,
)
from .swap import BlockSwapper, spread

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

__all__ = [
    "DTYPES", "HostRamEstimate", "MemoryHandle", "PRESET_TABLE", "TimeEstimate", "VramEstimate", "Workload",
    "available_host_bytes", "check_fits", "check_host_ram", "effective_train_config", "estimate_host_ram",
    "estimate_vram", "explicit_overrides", "flux_forward_flops", "free_vram_bytes",
    "plan_memory", "prepare_base", "prepare_training", "resolve_preset", "time_estimate",
]

_COMPUTE_DTYPE: "weakref.WeakKeyDictionary[torch.nn.Module, torch.dtype]" = weakref.WeakKeyDictionary()


def prepare_base(transformer: torch.nn.Module, mem: MemoryConfig, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Frozen base to its storage precision; call before the LoRA adapter is added.

    Everything goes to the compute dtype, nf4/int8 block linears become bitsandbytes layers; fp8 (and any
    other storage dtype) is applied by :func:`prepare_training`, so peft never initialises LoRA weights in fp8.
    """
    mem.validate()
    apply_base_precision(transformer, mem.base_precision, compute_dtype)
    _COMPUTE_DTYPE[transformer] = compute_dtype
    return transformer


@dataclass
class MemoryHandle:
    """What ``prepare_training`` installed; ``close()`` undoes hooks so the model can be reused."""

    device: torch.device
    swapper: BlockSwapper | None = None
    offloader: ActivationOffloader | None = None
    description: str = ""
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()

    def summary(self) -> str:
        return self.description


def prepare_training(transformer: torch.nn.Module, mem: MemoryConfig, device: torch.device | str) -> MemoryHandle:
    """Place the model for training once the adapter exists.

    LoRA masters in ``mem.lora_dtype`` computing in the compute dtype; block linears to their storage
    precision; everything on ``device`` except the frozen weights of swapped blocks, which stream from host
    RAM; per-block re-entrant checkpointing (see ``activations``); optional ``torch.compile`` of
    each block's forward; optional VRAM cap. Do not move the model while the handle is open.
    """
    mem.validate()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    compute_dtype = _COMPUTE_DTYPE.get(transformer, transformer.x_embedder.weight.dtype)
    lora_compute_in_input_dtype(transformer, DTYPES[mem.lora_dtype], compute_dtype)
    apply_storage_casts(transformer, mem.base_precision, compute_dtype)

    blocks = transformer_blocks(transformer)
    swapped = spread(mem.blocks_to_swap, len(blocks))
    for name, child in transformer.named_children():
        if name not in BLOCK_LISTS:
            place_module(child, device)
    for i, block in enumerate(blocks):
        if i in swapped:
            for param in block.parameters():
                if param.requires_grad:
                    param.data = param.data.to(device)  # LoRA weights (and optimizer state) live on the GPU
        else:
            place_module(block, device)

    handle = MemoryHandle(device)
    parts = [f"{mem.base_precision} base", f"LoRA {mem.lora_dtype}"]
    if swapped:
        handle.swapper = BlockSwapper(transformer, blocks, swapped, device, mem.prefetch_blocks)
        handle._undo.append(handle.swapper.close)
        parts.append(f"{len(swapped)} of {len(blocks)} blocks swapped ({len(handle.swapper.slots)} slots × "
                     f"{handle.swapper.slot_bytes / 2**20:.0f} MiB)")
    if mem.gradient_checkpointing:
        if mem.offload_activations:
            handle.offloader = ActivationOffloader(
                device, h2d_stream=handle.swapper.stream if handle.swapper and handle.swapper.cuda else None,
                min_bytes=1 << 20 if device.type == "cuda" else 0,
            )
        resident = [block for i, block in enumerate(blocks) if i not in swapped]
        keep = frozenset(resident[len(resident) - min(mem.uncheckpointed_blocks, len(resident)):])
        transformer.enable_gradient_checkpointing(checkpoint_fn(handle.offloader, keep))
        handle._undo.append(transformer.disable_gradient_checkpointing)
        parts.append(f"checkpointing ({len(blocks) - len(keep)} blocks)"
                     + (" + activations in host RAM" if mem.offload_activations else ""))
    if mem.compile_blocks:
        for block in blocks:
            block.forward = torch.compile(block.forward)
        handle._undo.append(lambda: [block.__dict__.pop("forward", None) for block in blocks])
        parts.append("compiled blocks")
    if mem.vram_budget_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, mem.vram_budget_gb * 2**30 / total), device)
        handle._undo.append(lambda: torch.cuda.set_per_process_memory_fraction(1.0, device))
        parts.append(f"capped at {mem.vram_budget_gb:g} GiB")
    handle.description = ", ".join(parts)
    log.info("memory: %s", handle.description)
    return handle
