"""Block swap: a host-to-device-only ring that streams frozen transformer blocks from pinned host memory.

``blocks_to_swap`` of the transformer's blocks keep their frozen weights in host RAM: each block's tensors are
packed into one page-locked buffer (the only host copy; the originals are released), laid out exactly like a
GPU slot, so loading a block is one asynchronous copy. The GPU holds ``prefetch + 1`` fixed slots, each big
enough for the largest swapped block. Before a swapped block runs, its weights are copied into a slot on a
side CUDA stream and its parameters become views of that slot; afterwards they point at an empty
placeholder, so any use of an unloaded block fails loudly instead of silently reading another block's slot.
Nothing is copied back: the base is frozen.

The order of use is known: forward ascends through the blocks, the backward pass (recomputation under
gradient checkpointing) descends, the next step ascends again. While one block computes, the next swapped
block in that order is already loading into a free slot. A slot keeps its contents after release, so the
blocks at the turn (end of forward → start of backward, end of backward → start of the next forward) are
reused without a copy. Swapped blocks are spread evenly over the execution order, so every transfer has the
compute of the resident blocks in between to hide behind.

Why not diffusers' group offloading: it prefetches in forward order only (none for the backward pass), blocks
the host on a stream synchronize at every onload, and offloads a block right after its forward, which moves
the weights that autograd saved for the backward pass. The ring below is written for training instead.

Requires gradient checkpointing with re-entrant checkpoints (``activations.checkpoint_fn``): a block's
backward then completes before the next block's recomputation begins, so a slot is never reused while the
backward pass still reads it, and layers that keep tensors in their autograd context (bitsandbytes) see the
slot of the recomputation, not of the first forward.

On a CPU device the same logic runs with synchronous copies into CPU slots (that is what the tests exercise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_ALIGN = 512  # slot offsets: keeps every view aligned for its dtype
_REGISTER_MIN = 64 * 2**20  # bytes: above glibc's largest mmap threshold, so such a buffer owns its pages


def spread(count: int, total: int) -> list[int]:
    """``count`` indices out of ``range(total)``, evenly spaced (all of them when count ≥ total)."""
    count = max(0, min(count, total))
    return sorted({int((j + 0.5) * total / count) for j in range(count)}) if count else []


def frozen_tensor_refs(block: nn.Module) -> list[tuple[Any, str]]:
    """(holder, attribute) of every frozen tensor a block computes with — parameters, buffers and the
    tensors bitsandbytes keeps beside them (nf4 quant states, int8 row scales)."""
    refs: list[tuple[Any, str]] = []
    for module in block.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                continue  # LoRA weights stay on the GPU with their optimizer state
            refs.append((param, "data"))
            refs.extend(_quant_state_refs(getattr(param, "quant_state", None)))
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                refs.append((module, name))
        state = getattr(module, "state", None)
        if state is not None and hasattr(module, "init_8bit_state"):  # bitsandbytes int8: CB is the weight data
            refs.extend((state, attr) for attr in ("CB", "SCB") if torch.is_tensor(getattr(state, attr, None)))
    return refs


def _quant_state_refs(qs) -> list[tuple[Any, str]]:
    if qs is None:
        return []
    refs = [(qs, attr) for attr in ("absmax", "code", "offset") if torch.is_tensor(getattr(qs, attr, None))]
    return refs + _quant_state_refs(getattr(qs, "state2", None))


def _get(ref: tuple[Any, str]) -> torch.Tensor:
    obj, attr = ref
    return obj.data if attr == "data" else getattr(obj, attr)


def _set(ref: tuple[Any, str], value: torch.Tensor) -> None:
    obj, attr = ref
    if attr == "data":
        obj.data = value
    else:
        setattr(obj, attr, value)


@dataclass
class _BlockLayout:
    refs: list[tuple[Any, str]]
    owner: list[int]  # refs[i] uses tensor owner[i] (two refs may share one, e.g. int8 weight and state.CB)
    specs: list[tuple[int, torch.dtype, torch.Size]]  # per tensor: byte offset, dtype, shape
    nbytes: int
    host: torch.Tensor | None = None  # uint8 [nbytes], page-locked on CUDA: the block's only host copy
    host_views: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Slot:
    buffer: torch.Tensor
    block: int | None = None  # whose weights the slot holds (valid even after release, until overwritten)
    ready: Any = None  # CUDA event: copy finished
    free: Any = None  # CUDA event: compute finished reading
    views: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class SwapStats:
    loads: int = 0  # block copies issued
    demand_loads: int = 0  # copies issued only when the block was already needed (not prefetched): stalls
    bytes_loaded: int = 0


class BlockSwapper:
    """Streams the frozen weights of ``swapped`` blocks (indices into ``blocks``) through GPU slots."""

    def __init__(self, transformer: nn.Module, blocks: list[nn.Module], swapped: list[int],
                 device: torch.device, prefetch: int = 1):
        self.blocks = blocks
        self.swapped = sorted(swapped)
        self._swapped_set = set(self.swapped)
        self.device = device
        self.prefetch = max(1, prefetch)
        self.cuda = device.type == "cuda"
        self.stats = SwapStats()
        self._held: int | None = None  # the swapped block computing (or whose backward may still run)
        self._training_pass = True
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self._registered: list[int] = []
        self._layouts = {i: self._pack(blocks[i]) for i in self.swapped}
        self.slot_bytes = max((lay.nbytes for lay in self._layouts.values()), default=0)
        n_slots = min(self.prefetch + 1, len(self.swapped))
        self.slots = [_Slot(torch.empty(self.slot_bytes, dtype=torch.uint8, device=device)) for _ in range(n_slots)]
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            for slot in self.slots:
                slot.ready, slot.free = torch.cuda.Event(), torch.cuda.Event()
        for i in self.swapped:
            self._unload(i)
        self._hooks = [transformer.register_forward_pre_hook(self._on_model_call)]
        for i, block in enumerate(blocks):
            self._hooks.append(block.register_forward_pre_hook(self._make_pre(i)))
            self._hooks.append(block.register_forward_hook(self._make_post(i)))
        self._prefetch_from(-1, backward=False)

    # ----- set-up -----
    def _pack(self, block: nn.Module) -> _BlockLayout:
        """Move a block's frozen tensors into one host buffer laid out like a slot."""
        refs = frozen_tensor_refs(block)
        tensors: list[torch.Tensor] = []
        owner: list[int] = []
        seen: dict[tuple, int] = {}
        for ref in refs:
            t = _get(ref)
            # the storage object, not data_ptr(): on the meta device (the dry run) every data_ptr() is 0
            key = (id(t.untyped_storage()), t.storage_offset(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if key not in seen:
                seen[key] = len(tensors)
                tensors.append(t)
            owner.append(seen[key])
        specs, total = [], 0
        for t in tensors:
            specs.append((total, t.dtype, t.shape))
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        layout = _BlockLayout(refs, owner, specs, total)
        host = torch.empty(total, dtype=torch.uint8)
        with torch.no_grad():
            for view, t in zip(self._views(host, layout), tensors):
                view.copy_(t)
        del tensors
        layout.host = self._page_lock(host)
        layout.host_views = self._views(layout.host, layout)
        for ref, k in zip(refs, owner):
            _set(ref, layout.host_views[k])  # the original tensors are released here
        return layout

    def _page_lock(self, buf: torch.Tensor) -> torch.Tensor:
        """Page-lock a block's host buffer so its copies run asynchronously.

        Big buffers are registered in place (cudaHostRegister): PyTorch's pinned allocator would round their
        size up to a power of two, wasting up to half the host RAM. Allocations this big are separate
        page-aligned mappings, so registrations never overlap. Small ones go through the pinned allocator.
        """
        if not self.cuda or buf.numel() == 0:
            return buf
        if buf.numel() >= _REGISTER_MIN and int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)) == 0:
            self._registered.append(buf.data_ptr())
            return buf
        return buf.pin_memory()

    @staticmethod
    def _views(buffer: torch.Tensor, layout: _BlockLayout) -> list[torch.Tensor]:
        return [buffer[off:off + shape.numel() * dtype.itemsize].view(dtype).view(shape)
                for off, dtype, shape in layout.specs]

    def _slot_views(self, slot: _Slot, index: int) -> list[torch.Tensor]:
        views = slot.views.get(index)
        if views is None:
            views = slot.views[index] = self._views(slot.buffer, self._layouts[index])
        return views

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    def _unload(self, index: int) -> None:
        lay = self._layouts[index]
        for ref, k in zip(lay.refs, lay.owner):
            _set(ref, self._placeholder(lay.specs[k][1]))

    # ----- the ring -----
    def _slot_holding(self, index: int) -> _Slot | None:
        for slot in self.slots:
            if slot.block == index:
                return slot
        return None

    def _free_slot(self, keep: set[int]) -> _Slot | None:
        """A slot not computing and not holding a block we still want; empty slots first."""
        candidates = [s for s in self.slots if s.block is None or (s.block != self._held and s.block not in keep)]
        candidates.sort(key=lambda s: s.block is not None)
        return candidates[0] if candidates else None

    def _load(self, index: int, slot: _Slot) -> None:
        lay = self._layouts[index]
        slot.block = index
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(slot.free)  # the compute stream is done with the previous contents
                slot.buffer[:lay.nbytes].copy_(lay.host, non_blocking=True)
                slot.ready.record(self.stream)
        else:
            slot.buffer[:lay.nbytes].copy_(lay.host)
        self.stats.loads += 1
        self.stats.bytes_loaded += lay.nbytes

    def _acquire(self, index: int, upcoming: list[int]) -> None:
        slot = self._slot_holding(index)
        if slot is None:
            slot = self._free_slot(set(upcoming[: self.prefetch])) or self._free_slot(set())
            self._load(index, slot)
            self.stats.demand_loads += 1
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        lay = self._layouts[index]
        views = self._slot_views(slot, index)
        for ref, k in zip(lay.refs, lay.owner):
            _set(ref, views[k])
        self._held = index

    def _release(self, index: int) -> None:
        slot = self._slot_holding(index)
        if self.cuda and slot is not None:
            slot.free.record(torch.cuda.current_stream(self.device))
        self._unload(index)
        if self._held == index:
            self._held = None

    def _upcoming(self, index: int, backward: bool) -> list[int]:
        """Swapped blocks in the order they will next be used, after block ``index``."""
        s = self.swapped
        if backward:
            return [i for i in reversed(s) if i < index] + s  # then the next step's forward
        if self._training_pass:
            return [i for i in s if i > index] + list(reversed(s))  # then this step's backward
        return [i for i in s if i > index] + s

    def _prefetch_from(self, index: int, backward: bool) -> None:
        """Fill the slots with the next swapped blocks to be used (the held one keeps its slot)."""
        room = len(self.slots) - (self._held is not None)
        window: list[int] = []
        for i in self._upcoming(index, backward):
            if i != self._held and i not in window:
                window.append(i)
                if len(window) == room:
                    break
        for i in window:
            if self._slot_holding(i) is None:
                slot = self._free_slot(set(window))
                if slot is None:
                    break
                self._load(i, slot)

    # ----- hooks -----
    def _on_model_call(self, module, args):
        self._training_pass = torch.is_grad_enabled()  # a forward that a backward pass will follow

    def _make_pre(self, index: int):
        def pre(module, args):
            backward = torch._C._current_graph_task_id() != -1  # inside autograd: a recomputation
            if self._held is not None and self._held != index:
                self._release(self._held)  # its backward has finished (re-entrant checkpoints run one at a time)
            upcoming = self._upcoming(index, backward)
            if index in self._swapped_set:
                self._acquire(index, upcoming)
            self._prefetch_from(index, backward)

        return pre

    def _make_post(self, index: int):
        def post(module, args, output):
            if torch._C._current_graph_task_id() != -1:
                return  # recomputation inside backward: the block's own backward comes next
            if self._held == index:
                self._release(index)
            self._prefetch_from(index, backward=False)

        return post

    def close(self) -> None:
        """Remove the hooks and point every swapped parameter back at host memory (the model is whole again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.cuda:
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        for i in self.swapped:
            lay = self._layouts[i]
            for ref, k in zip(lay.refs, lay.owner):
                _set(ref, lay.host_views[k])
        if self._registered:  # unpinned, the buffers stay valid host memory behind the views
            cudart = torch.cuda.cudart()
            for ptr in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered = []
        self.slots = []
