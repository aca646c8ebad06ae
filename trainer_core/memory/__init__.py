"""Memory engine: how the frozen base is stored, placed and streamed while a LoRA trains.

The trainer calls two functions in this order:
``prepare_base`` (precision of the frozen weights, before the adapter exists), then — after
``lora.add_lora`` — ``prepare_training`` (device placement, LoRA dtype, activation checkpointing), and
``MemoryHandle.close()`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import MemoryConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def prepare_base(transformer: torch.nn.Module, mem: MemoryConfig, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Cast the frozen base to its storage precision; call before the LoRA adapter is added."""
    mem.validate()
    transformer.requires_grad_(False)
    return transformer.to(dtype=compute_dtype)


@dataclass
class MemoryHandle:
    """What ``prepare_training`` installed; ``close()`` undoes hooks so the model can be reused."""

    device: torch.device
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()


def prepare_training(transformer: torch.nn.Module, mem: MemoryConfig, device: torch.device | str) -> MemoryHandle:
    """Place the model for training once the adapter exists: LoRA master weights, device, checkpointing."""
    device = torch.device(device)
    lora_dtype = DTYPES[mem.lora_dtype]
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(lora_dtype)
    transformer.to(device)
    handle = MemoryHandle(device)
    if mem.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        handle._undo.append(transformer.disable_gradient_checkpointing)
    return handle
