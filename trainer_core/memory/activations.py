"""Activation memory: per-block gradient checkpointing, optionally with the saved block inputs in host RAM.

With checkpointing, the only activations kept between forward and backward are each block's inputs
(≈ 28 MB per block at 1024², 57 blocks ≈ 1.6 GB). :class:`ActivationOffloader` moves those to pinned host
memory on a side stream as they are saved, and brings them back one block ahead of the backward pass.

Checkpoints are re-entrant (``use_reentrant=True``, not diffusers' default): the block's forward runs under
no_grad, so layers that keep tensors in their autograd context rather than in ``save_for_backward``
(bitsandbytes int8 keeps the layer input there) hold nothing between forward and backward — under
non-re-entrant checkpoints they would keep every block's activations alive. The block's saved inputs pass
through ``saved_tensors_hooks`` (so they can be offloaded), and the whole backward of one block finishes
before the next block is recomputed (the swap ring relies on that).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint


@dataclass
class _Saved:
    host: torch.Tensor
    index: int
    d2h_done: Any = None  # CUDA event
    device_copy: torch.Tensor | None = None
    ready: Any = None  # CUDA event
    used: bool = False


class ActivationOffloader:
    """saved_tensors_hooks that keep large saved tensors in pinned host memory until the backward pass."""

    def __init__(self, device: torch.device, h2d_stream=None, min_bytes: int = 1 << 20, ahead: int = 4):
        self.device = device
        self.cuda = device.type == "cuda"
        self.min_bytes = min_bytes
        self.ahead = ahead  # saved tensors fetched ahead of the backward pass (≈ two blocks' inputs)
        self._saved: list[_Saved] = []
        self._pass_used = False
        self.bytes_offloaded = 0
        if self.cuda:
            self.d2h = torch.cuda.Stream(device)
            self.h2d = h2d_stream or torch.cuda.Stream(device)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if t.device != self.device or t.numel() * t.element_size() < self.min_bytes:
            return t
        if self._pass_used:  # a new forward pass: forget the previous one's handles
            self._saved, self._pass_used = [], False
        with torch.no_grad():
            if self.cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self.d2h.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.d2h):
                    host.copy_(t, non_blocking=True)
                    done = self.d2h.record_event()
                t.record_stream(self.d2h)  # keep its memory from reuse until the copy has read it
            else:
                host, done = t.detach().clone(), None  # CPU runs: a separate copy stands in for host memory
        saved = _Saved(host, len(self._saved), done)
        self._saved.append(saved)
        self.bytes_offloaded += t.numel() * t.element_size()
        return saved

    def _fetch(self, saved: _Saved) -> None:
        if not self.cuda:
            saved.device_copy = saved.host
            return
        with torch.cuda.stream(self.h2d):
            self.h2d.wait_event(saved.d2h_done)
            copy = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=self.device)
            copy.copy_(saved.host, non_blocking=True)
            saved.ready = self.h2d.record_event()
        saved.device_copy = copy

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        if saved.device_copy is None:
            self._fetch(saved)
        t, saved.device_copy = saved.device_copy, None  # the backward pass holds it only while it needs it
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(saved.ready)
            t.record_stream(stream)
        saved.used = self._pass_used = True
        for earlier in reversed(self._saved[max(0, saved.index - self.ahead):saved.index]):
            if earlier.device_copy is None and not earlier.used:
                self._fetch(earlier)  # the blocks before this one are recomputed next
        return t


def checkpoint_fn(offloader: ActivationOffloader | None = None, keep: frozenset = frozenset()):
    """A ``gradient_checkpointing_func`` for diffusers: re-entrant, optionally offloading saved inputs.

    Blocks in ``keep`` run without checkpointing: their activations stay for the backward pass, which then
    skips their recomputation (spending VRAM the checkpointed blocks leave free on speed).
    """

    def run(module, *args):
        if module in keep:
            return module(*args)
        if not any(torch.is_tensor(a) and a.requires_grad for a in args):
            if not any(p.requires_grad for p in module.parameters()):
                return module(*args)  # nothing trainable here or upstream: no graph, no recomputation
            # Re-entrant checkpoints only produce gradients if an input requires them; the first trained
            # block's input comes from frozen layers, so make it a leaf that does (nothing upstream trains).
            args = (args[0].detach().requires_grad_(),) + args[1:]
        hooks = offloader.hooks() if offloader is not None else contextlib.nullcontext()
        with hooks:
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=True)

    return run
