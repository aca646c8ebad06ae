"""Storage precision of the frozen base (bf16, fp32, fp8, nf4, int8) and compute-dtype LoRA.

Rule: every parameter outside the blocks' linear layers (embedders, norms, biases) is kept in the compute
dtype; the blocks' linear weights — 99 % of FLUX — are kept in the storage precision:

* auto: the compute dtype.
* bf16 / fp32: plain tensors (a cast on use when storage ≠ compute).
* fp8 (e4m3fn): one byte per weight, cast to the compute dtype inside the matmul (:class:`CastLinear`).
* nf4 / int8: bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers with the compute dtype.

Why not diffusers' layerwise casting for fp8: its hooks re-cast every weight back to fp8 after each call
(a new allocation and copy per layer per call) and swap ``.data``, which would fight the block-swap ring's
slot views; a cast inside the matmul does the same arithmetic with neither. The custom autograd function
below also keeps only the fp8 weight for the backward pass, not a bf16 copy of it.

LoRA master weights stay in ``lora_dtype`` (fp32 by default) but compute in the compute dtype: lora_A /
lora_B become :class:`CastLinear` (a differentiable cast, so gradients land on the fp32 masters) and peft's
own input up-cast is switched off — otherwise every LoRA input would be copied to fp32 and kept for backward.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; clamp so outliers saturate instead of becoming NaN
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": FP8}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks in execution order (FLUX.1: 19 double, then 38 single)."""
    blocks: list[nn.Module] = []
    for name in BLOCK_LISTS:
        blocks.extend(getattr(transformer, name, ()))
    return blocks


class _FrozenLinearFn(torch.autograd.Function):
    """y = x·W(cast)ᵀ + b for a frozen W stored in another dtype; backward re-casts W instead of saving the cast."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad.matmul(weight.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class CastLinear(nn.Linear):
    """A Linear whose weight is stored in one dtype and used in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype and (self.bias is None or self.bias.dtype == x.dtype):
            return F.linear(x, self.weight, self.bias)
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)  # differentiable cast: grads reach the masters
        return _FrozenLinearFn.apply(x, self.weight, self.bias)


def _as_cast_linear(module: nn.Module) -> None:
    if type(module) is nn.Linear:
        module.__class__ = CastLinear


def _block_linears(transformer: nn.Module, blocks: list[nn.Module] | None = None,
                   only: list[nn.Module] | None = None):
    """(parent, attribute, Linear) for every plain frozen Linear inside the blocks (LoRA's own layers excluded), or
    for those of ``only``."""
    wanted = None if only is None else {id(m) for m in only}
    for block in transformer_blocks(transformer) if blocks is None else blocks:
        for parent in block.modules():
            if isinstance(parent, nn.ModuleDict):
                continue  # peft's lora_A / lora_B containers
            for attr, child in parent.named_children():
                if isinstance(child, nn.Linear) and not child.weight.requires_grad \
                        and (wanted is None or id(child) in wanted):
                    yield parent, attr, child


def apply_base_precision(transformer: nn.Module, precision: str, compute_dtype: torch.dtype) -> None:
    """Before the adapter exists: everything to the compute dtype; nf4/int8 block linears to bitsandbytes.

    fp8 and a storage dtype other than the compute dtype are applied by :func:`apply_storage_casts` after
    the adapter is added, so peft creates (and initialises) the LoRA weights in bf16, not in fp8. Block
    weights that already arrive in their storage dtype (an fp8 checkpoint with ``precision`` fp8, or a streamed
    load) are left as they are rather than copied to the compute dtype and back: their LoRA starts from an
    fp8-rounded init instead.
    Tensors already in the right dtype are not copied (views into a caller's weights stay views).
    """
    transformer.requires_grad_(False)
    storage = STORAGE_DTYPES.get(precision)
    keep = {id(linear.weight) for _, _, linear in _block_linears(transformer) if linear.weight.dtype == storage}
    for module in transformer.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != compute_dtype and id(tensor) not in keep:
                tensor.data = tensor.data.to(compute_dtype)
    if precision in ("nf4", "int8"):
        quantize_block_linears(transformer, precision, compute_dtype)


def apply_storage_casts(transformer: nn.Module, precision: str, compute_dtype: torch.dtype) -> int:
    """After the adapter: block linear weights to bf16/fp32/fp8 storage with a cast on use. Returns the count."""
    storage = STORAGE_DTYPES.get(precision)
    if storage is None or storage == compute_dtype:
        return 0
    work = torch.device("cuda") if torch.cuda.is_available() else None  # 12 B casts: far faster on a GPU
    count = 0
    for _, _, linear in list(_block_linears(transformer)):
        if type(linear) is not nn.Linear and type(linear) is not CastLinear:
            continue  # bitsandbytes layers keep their own storage
        if linear.weight.dtype != storage:  # streamed loads arrive in their storage already
            linear.weight.data = _to_storage(linear.weight.data, storage, work)
        _as_cast_linear(linear)
        count += 1
    return count


@torch.no_grad()
def _to_storage(weight: torch.Tensor, storage: torch.dtype, work: torch.device | None = None) -> torch.Tensor:
    home = weight.device
    weight = weight.to(work or home)
    if storage == FP8:
        weight = weight.clamp(-FP8_MAX, FP8_MAX)
    return weight.to(storage).to(home)


def store_block(block: nn.Module, precision: str, compute_dtype: torch.dtype,
                linears: list[nn.Module] | None = None) -> None:
    """A freshly loaded block's frozen linears (or only ``linears`` of it) to their storage precision (the streaming
    loader's step, one linear at a time as each is read).

    fp8 (or another plain storage dtype) becomes the weights' dtype now — :func:`apply_storage_casts` later
    only switches the layers to cast on use; nf4/int8 layers become bitsandbytes layers, which
    :func:`apply_base_precision` then leaves alone.
    """
    for module in linears or [block]:
        module.requires_grad_(False)
    if precision in ("nf4", "int8"):
        quantize_block_linears(block, precision, compute_dtype, blocks=[block], only=linears)
        return
    storage = STORAGE_DTYPES.get(precision)
    if storage is None or storage == compute_dtype:
        return
    for _, _, linear in _block_linears(block, [block], linears):
        if linear.weight.dtype != storage:  # already stored so (e.g. a ComfyUI fp8 MODEL's own tensor): kept as is
            linear.weight.data = _to_storage(linear.weight.data, storage)


def lora_compute_in_input_dtype(transformer: nn.Module, lora_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """LoRA masters to ``lora_dtype``; their matmuls run in the activations' dtype. Returns the layer count."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in transformer.modules():
        if not isinstance(module, LoraLayer):
            continue
        module.cast_input_dtype_enabled = False  # peft would copy every input to the masters' dtype
        for container in (module.lora_A, module.lora_B):
            for layer in container.values():
                for param in layer.parameters():
                    param.data = param.data.to(lora_dtype)
                if lora_dtype != compute_dtype:
                    _as_cast_linear(layer)
        count += 1
    return count


def quantize_block_linears(transformer: nn.Module, precision: str, compute_dtype: torch.dtype,
                           blocks: list[nn.Module] | None = None, only: list[nn.Module] | None = None) -> int:
    """Replace the blocks' (default: all) Linear layers (or only those of ``only``) with bitsandbytes nf4 or int8
    layers (quantized on the GPU if any)."""
    import bitsandbytes as bnb

    quant_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    count = 0
    for parent, attr, linear in list(_block_linears(transformer, blocks, only)):
        if type(linear) not in (nn.Linear, CastLinear):
            continue
        home = linear.weight.device
        has_bias = linear.bias is not None
        weight = linear.weight.data.to("cpu", compute_dtype)  # bnb quantizes on the move off the CPU
        if precision == "nf4":
            if linear.in_features < 64:
                from ..errors import TrainerInputError

                raise TrainerInputError(
                    f"memory.base_precision: nf4 needs linear layers at least 64 wide; this model has "
                    f"{linear.in_features}. Use fp8 or bf16 for this model."
                )
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                    compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=new)
        else:
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                      has_fp16_weights=False, threshold=0.0, device="meta")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            new.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        new = new.to(quant_device)
        if home != quant_device:
            new = new.to(home)
        if precision == "int8":
            _int8_scales_to_state(new)
        new.train(linear.training)
        setattr(parent, attr, new)
        count += 1
    if blocks is None:
        log.info("quantized %d block linear layers to %s", count, precision)
    return count


def _is_int8(module: nn.Module) -> bool:
    return hasattr(module, "init_8bit_state") and hasattr(module, "state")


def _int8_scales_to_state(layer: nn.Module) -> None:
    """Hold an int8 layer's weights once: ``state.CB`` is the weight data itself, ``state.SCB`` its scales.

    bitsandbytes moves them from the parameter to ``state`` on the first forward; doing it up front gives
    the block-swap ring fixed places to stream, and keeps ``.to()`` from copying CB separately.
    """
    scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
    layer.state.CB = layer.weight.data
    layer.state.SCB = scb
    layer.weight.CB = None
    layer.weight.SCB = None


def place_module(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)``, also for bitsandbytes int8 layers whose scales live outside the parameters."""
    scales = [(sub, sub.state.SCB) for sub in module.modules() if _is_int8(sub)]
    module.to(device)
    for sub, scb in scales:
        sub.weight.CB = sub.weight.SCB = None
        sub.state.CB = sub.weight.data
        sub.state.SCB = None if scb is None else scb.to(device)
