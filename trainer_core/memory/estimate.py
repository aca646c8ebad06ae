"""Peak-VRAM estimate of a FLUX LoRA training step, before anything is loaded.

Weights, LoRA, gradients, optimizer state and swap slots are counted exactly from the module shapes of the
model config (built on the meta device, so nothing is allocated) and the storage rules of ``precision``.
Activations are counted in units of one token-row of hidden states in the compute dtype,
``u = batch · tokens · hidden · bytes(compute dtype)`` (tokens = image + text): with a fused attention kernel
every saved tensor of a block scales with it. Without one, the attention probabilities (heads · tokens² per
sample) are materialised too and counted apart.

Besides the peak, the estimate plans time: the bytes each step moves host→device (swapped blocks, offloaded
activations) at a stated bandwidth, and the FLOPs at a stated matmul throughput, whichever floor is higher
being the bound of that plan. :func:`estimate_host_ram` does the same accounting for host RAM.

The per-block coefficients were measured by tracking the bytes of every tensor alive during a training step
of narrow FLUX blocks (head dim 128, hidden 512 and 1024: the same values in units of u) with this package's
own layers and re-entrant checkpoints, then lowered by 2 u per block for CUDA, whose fused RMSNorm keeps
the bf16 input for backward where the CPU composite keeps an fp32 copy. The GPU benchmark prints the
estimate next to the measured peak for every preset.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import MemoryConfig
from .swap import spread

GiB = 2**30
MiB = 2**20

# Per block, in units of u, measured per family (the family's ``activation_coeffs``, keyed by LoRA target preset,
# and ``frozen_coeffs``), each a tuple (S_double, S_single, P_double, P_single, Q_double, Q_single). S: tensors kept
# from forward to backward without checkpointing. P: peak of one block's recomputation + backward above what was
# live before it (checkpointing). Q: transient on top of the saved tensors without checkpointing. Blocks holding
# LoRA layers use their preset's entry (custom regexes the largest, "all+ffs"); blocks without any (after the first
# that has one) use the frozen entry, blocks before it keep nothing.
_CUDA_RMSNORM_SAVING = 2.0  # u per block: fused RMSNorm on CUDA keeps bf16 inputs, not fp32 copies
_MISC_ACTIVATIONS = 1.5  # u: embedders' outputs, final norm, loss
_OFFLOAD_IN_FLIGHT = 3.0  # u: inputs of the block computing, one being written out, two fetched ahead
_CUDA_OVERHEAD = 64 * MiB  # cuBLAS workspaces and small buffers the caching allocator also counts
# What no allocator statistic shows but the card must hold: the CUDA context (≈ 300–600 MiB with cuBLAS/cuDNN
# loaded) and the allocator's fragmentation. The fit check (presets.fits) leaves FIT_MARGIN + FIT_RESERVE for them.

# Stated hardware for the time floors (override per Workload): PCIe 4.0 x16 moves ≈ 25 GB/s host→device from
# pinned memory in practice; 165 TFLOP/s is an RTX 4090's dense bf16 matmul rate.
H2D_GB_PER_S = 25.0
GPU_TFLOPS = 165.0

_NF4_OVERHEAD_PER_LAYER = 1092  # bytes: nf4 code table (64), nested code table (1024), offset (4)

DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def fmt_bytes(n: float) -> str:
    """GiB for big numbers, MiB/KiB for the small ones (a tiny test model is not "0.00 GiB")."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size or unit == "KiB":
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass
class VramEstimate:
    """Predicted peak of ``torch.cuda.max_memory_allocated`` for one training step (bytes)."""

    weights: int  # resident frozen base (and everything outside the blocks)
    swap_slots: int
    lora: int
    grads: int
    optimizer: int
    activations: int
    transient: int  # the largest temporary weight copy (fp8/nf4 dequantised for a matmul)
    overhead: int
    blocks_swapped: int = 0
    blocks_total: int = 0
    tokens: int = 0
    resolution: tuple[int, int] = (0, 0)
    batch_size: int = 1
    notes: list[str] = field(default_factory=list)
    device_type: str = "cuda"
    h2d_bytes: int = 0  # moved host→device per step: swapped blocks and offloaded activations
    step_flops: int = 0  # forward + backward (+ recomputation) of one step
    h2d_gb_per_s: float = H2D_GB_PER_S
    gpu_tflops: float = GPU_TFLOPS

    @property
    def transfer_seconds(self) -> float:
        return self.h2d_bytes / (self.h2d_gb_per_s * 1e9)

    @property
    def compute_seconds(self) -> float:
        return self.step_flops / (self.gpu_tflops * 1e12)

    @property
    def step_floor_seconds(self) -> float:
        """No step can be faster than this: the larger of the transfer and compute floors (they overlap at best)."""
        return max(self.transfer_seconds, self.compute_seconds)

    @property
    def bound(self) -> str:
        return "transfer-bound" if self.transfer_seconds > self.compute_seconds else "compute-bound"

    def time_summary(self) -> str:
        return (f"per step: {self.h2d_bytes / 1e9:.1f} GB host→device ({self.transfer_seconds:.2f} s at "
                f"{self.h2d_gb_per_s:g} GB/s), {self.step_flops / 1e12:.0f} TFLOP ({self.compute_seconds:.2f} s at "
                f"{self.gpu_tflops:g} TFLOP/s) → {self.bound}, ≥ {self.step_floor_seconds:.2f} s/step")

    @property
    def total(self) -> int:
        return (self.weights + self.swap_slots + self.lora + self.grads + self.optimizer + self.activations
                + self.transient + self.overhead)

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def summary(self) -> str:
        w, h = self.resolution
        if self.device_type != "cuda":  # a CPU run: one memory holds everything, there is no GPU to fit
            lines = [f"memory estimate at {w}×{h}, batch {self.batch_size} (training on the CPU, all in host RAM): "
                     f"{fmt_bytes(self.total)} peak",
                     f"  base weights: {fmt_bytes(self.weights)}",
                     f"  LoRA weights + grads + optimizer state: {fmt_bytes(self.lora + self.grads + self.optimizer)}",
                     f"  activations and temporaries: {fmt_bytes(self.activations + self.transient)}"]
            return "\n".join(lines + [f"  note: {n}" for n in self.notes])
        rows = [
            ("base weights on GPU", self.weights),
            (f"swap slots ({self.blocks_swapped} of {self.blocks_total} blocks in host RAM)", self.swap_slots),
            ("LoRA weights + grads", self.lora + self.grads),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("temporaries", self.transient + self.overhead),
        ]
        lines = [f"VRAM estimate at {w}×{h}, batch {self.batch_size}: {self.total_gib:.2f} GiB peak"]
        lines += [f"  {name}: {fmt_bytes(value)}" for name, value in rows if value]
        lines.append(f"  {self.time_summary()}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _default_config(model_config: dict | None) -> dict:
    if model_config is None:
        from ..models.flux import flux_config

        return flux_config("flux1-dev")
    return model_config


def _family(model_config: dict | None):
    from ..models.family import detect_family

    return detect_family(_default_config(model_config))


def _meta_model(model_config: dict | None) -> nn.Module:
    """The model's module tree on the meta device (shapes only), cached per config."""
    config = {k: v for k, v in _default_config(model_config).items() if not k.startswith("_")}
    return _meta_model_cached(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _meta_model_cached(config_json: str) -> nn.Module:
    from ..models.family import detect_family

    config = json.loads(config_json)
    with torch.device("meta"):
        return detect_family(config).model_class()(**config)


def _image_tokens(family, width: int, height: int) -> int:
    """Image tokens of a ``width`` × ``height`` picture (both FLUX families: one token per 16×16 pixels)."""
    _, h, w = family.latent_shape(height, width)
    return family.image_token_count(h, w)


def _linear_bytes(linear: nn.Linear, precision: str, compute_bytes: int) -> int:
    """Bytes of one frozen block linear in the storage ``precision`` (bias in the compute dtype)."""
    n = linear.weight.numel()
    bias = linear.out_features * compute_bytes if linear.bias is not None else 0
    if precision == "fp8":
        return n + bias
    if precision == "nf4":  # packed 4-bit + nested 8-bit absmax per 64 + fp32 absmax per 256 of those
        blocks = -(-n // 64)
        return -(-n // 2) + blocks + -(-blocks // 256) * 4 + _NF4_OVERHEAD_PER_LAYER + bias
    if precision == "int8":
        return n + linear.out_features * 4 + bias
    return n * DTYPE_BYTES.get(precision, compute_bytes) + bias


def block_bytes(block: nn.Module, precision: str, compute_bytes: int) -> int:
    """Bytes of a transformer block's frozen weights in the given storage precision."""
    total = 0
    for module in block.modules():
        if isinstance(module, nn.Linear):
            total += _linear_bytes(module, precision, compute_bytes)
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False)) * compute_bytes
    return total


def _swap_block_bytes(block: nn.Module, precision: str, compute_bytes: int) -> int:
    """Slot bytes of a block as the swap ring lays it out (every tensor aligned to 512 bytes)."""
    align = lambda n: -(-n // 512) * 512  # noqa: E731
    total = 0
    for module in block.modules():
        if isinstance(module, nn.Linear):
            n, out = module.weight.numel(), module.out_features
            bias = align(out * compute_bytes) if module.bias is not None else 0
            if precision == "fp8":
                total += align(n) + bias
            elif precision == "nf4":  # + code table (64 B), offset (4 B), nested code table (1 KiB)
                blocks = -(-n // 64)
                total += align(-(-n // 2)) + align(blocks) + align(-(-blocks // 256) * 4) + 2048 + bias
            elif precision == "int8":
                total += align(n) + align(out * 4) + bias
            else:
                total += align(n * DTYPE_BYTES.get(precision, compute_bytes)) + bias
        else:
            total += sum(align(p.numel() * compute_bytes) for p in module.parameters(recurse=False))
    return total


def _targeted_linears(model: nn.Module, targets: str) -> list[nn.Linear]:
    pattern = re.compile(_resolve(targets, model))
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(name)]


def _lora_bytes_per_block(model: nn.Module, targets: str, rank: int, lora_bytes: int) -> list[int]:
    pattern = re.compile(_resolve(targets, model))
    sizes = []
    names = _block_names(model)
    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        prefix = names[id(block)]
        sizes.append(sum(rank * (m.in_features + m.out_features) * lora_bytes for name, m in block.named_modules()
                         if isinstance(m, nn.Linear) and pattern.fullmatch(f"{prefix}.{name}")))
    return sizes


def _block_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules() if name.count(".") == 1 and "blocks." in name}


def _resolve(targets: str, model: nn.Module) -> str:
    from ..lora import resolve_targets

    return resolve_targets(targets, model)


def _optimizer_bytes(n_params: int, optimizer: str, lora_bytes: int) -> int:
    """Optimizer state: per value, 8-bit states cost a byte (+ an fp32 absmax per 256), others the parameters'
    dtype. AdamW: 2 moments; Lion: 1; Adafactor: first moment (second moment factored, negligible);
    Prodigy: 2 moments + s + the initial weights."""
    eight_bit = {"adamw8bit": 2, "paged_adamw8bit": 2, "lion8bit": 1}
    if optimizer in eight_bit:
        return eight_bit[optimizer] * (n_params + 4 * (-(-n_params // 256)))
    states = {"adamw": 2, "adafactor": 1, "prodigy": 4}.get(optimizer, 2)
    return states * n_params * lora_bytes


def estimate_vram(
    model_config: dict | None = None,
    mem: MemoryConfig | None = None,
    *,
    resolution: int | tuple[int, int] = 1024,
    batch_size: int | None = None,
    rank: int = 16,
    targets: str = "attention",
    optimizer: str | None = None,
    text_tokens: int = 512,
    compute_dtype: str = "bf16",
    device_type: str = "cuda",
    fused_attention: bool = True,
    h2d_gb_per_s: float = H2D_GB_PER_S,
    gpu_tflops: float = GPU_TFLOPS,
) -> VramEstimate:
    """Predict peak allocated VRAM of a training step, and its time floors.

    ``model_config``: diffusers FluxTransformer2DModel config (default FLUX.1-dev); ``mem``: resolved
    memory knobs (``mem.batch_size`` / ``mem.optimizer`` win over the arguments when set); ``resolution``:
    image side or (width, height) in pixels; ``text_tokens``: T5 sequence length; ``fused_attention``: False
    where no flash / memory-efficient attention kernel runs (the attention probabilities are then stored);
    ``h2d_gb_per_s`` / ``gpu_tflops``: the hardware the time floors assume.
    """
    mem = mem or MemoryConfig()
    batch = mem.batch_size or batch_size or 1
    optimizer = mem.optimizer or optimizer or "adamw"
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    model = _meta_model(model_config)
    family = _family(model_config)
    cb = DTYPE_BYTES[compute_dtype]
    lb = DTYPE_BYTES[mem.lora_dtype]
    precision = mem.base_precision
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    n_double = len(model.transformer_blocks)
    swapped = set(spread(mem.blocks_to_swap, len(blocks)))

    outside = sum(p.numel() for name, p in model.named_parameters()
                  if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")))
    weights = outside * cb + sum(block_bytes(b, precision, cb) for i, b in enumerate(blocks) if i not in swapped)
    slots = 0
    if swapped:
        n_slots = min(mem.prefetch_blocks + 1, len(swapped))
        slots = n_slots * max(_swap_block_bytes(blocks[i], precision, cb) for i in swapped)

    lora_params = sum(rank * (m.in_features + m.out_features) for m in _targeted_linears(model, targets))
    lora = lora_params * lb
    grads = lora_params * lb
    opt = _optimizer_bytes(lora_params, optimizer, lb)

    hidden = model.inner_dim
    image_tokens = _image_tokens(family, width, height)
    tokens = image_tokens + text_tokens
    u = batch * tokens * hidden * cb
    # Without a fused kernel, PyTorch's math attention computes in fp32 and materialises softmax(QKᵀ)
    # (batch · heads · tokens² fp32 values): kept for backward by blocks that keep their activations; scores and
    # their gradient add as much again while computing (measured by the dry run's test).
    attn = 0.0 if fused_attention else model.config.num_attention_heads * tokens * 4 / (hidden * cb)
    attn_extra = (attn,) * 2 + (2 * attn,) * 4  # added to S, S, P, P, Q, Q
    # fp32 compute: the composite RMSNorm's up-cast is the input itself, no copy either
    rmsnorm_saving = (_CUDA_RMSNORM_SAVING,) * 4 + (0.0, 0.0) if device_type == "cuda" or compute_dtype == "fp32" \
        else (0.0,) * 6
    coeffs = family.activation_coeffs
    with_lora = [c - d + a for c, d, a in zip(coeffs.get(targets, coeffs["all+ffs"]), rmsnorm_saving, attn_extra)]
    frozen = [c - d + a for c, d, a in zip(family.frozen_coeffs, rmsnorm_saving, attn_extra)]
    # Walk the backward pass block by block (last block first). Alive at each block: the saved inputs of the
    # checkpointed blocks not yet reached (or, offloaded, the few in flight), everything saved by the
    # uncheckpointed ones not yet reached, the LoRA gradients filled so far, and this block's own transient
    # (P: recomputation + backward of a checkpointed block; Q: backward of one that kept its activations).
    n_blocks = len(blocks)
    if mem.gradient_checkpointing:
        resident = [i for i in range(n_blocks) if i not in swapped]
        kept = set(resident[len(resident) - min(mem.uncheckpointed_blocks, len(resident)):])
    else:
        kept = set(range(n_blocks))
    block_grads = _lora_bytes_per_block(model, targets, rank, lb)
    # Blocks before the first one with a LoRA need no gradients: they keep nothing and have no backward.
    first = next((i for i, g in enumerate(block_grads) if g), n_blocks)

    def coeff(i: int, which: int) -> float:  # which: 0 S, 1 P, 2 Q
        table = with_lora if block_grads[i] else frozen
        return table[2 * which + (0 if i < n_double else 1)]

    held = {i: 0.0 if i < first else coeff(i, 0) if i in kept else (0.0 if mem.offload_activations else 1.0)
            for i in range(n_blocks)}
    alive = _MISC_ACTIVATIONS + (_OFFLOAD_IN_FLIGHT if mem.offload_activations and len(kept) < n_blocks else 0.0)
    alive += sum(held.values())
    grads_so_far, peak = 0, 0.0
    for i in reversed(range(n_blocks)):
        own = 0.0 if i < first else coeff(i, 2) if i in kept else coeff(i, 1)
        peak = max(peak, (alive + own) * u + grads_so_far)
        alive -= held[i]
        grads_so_far += block_grads[i]
    activations = int(peak) - grads

    transient = 0
    if precision in ("fp8", "nf4", "int8") or DTYPE_BYTES.get(precision, cb) != cb:
        biggest = max(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, nn.Linear))
        transient = biggest * cb  # one weight in the compute dtype at a time
        if precision == "int8":  # int32 matmul output and the dequantised weight for backward
            transient = 2 * biggest * cb + 8 * u
    # Host→device per step: every swapped block twice (forward, then the backward's recomputation) except the
    # ones still in a slot at the turns (the swap ring reuses them), plus each offloaded block input once.
    h2d = 0
    if swapped:
        order = sorted(swapped)
        sizes = [_swap_block_bytes(blocks[i], precision, cb) for i in order]
        reused = min(mem.prefetch_blocks + 1, len(order))
        h2d = 2 * sum(sizes) - sum(sizes[len(sizes) - reused:]) - sum(sizes[:reused]) if len(order) > reused else 0
    offloaded = [i for i in range(first, n_blocks) if i not in kept] if mem.offload_activations else []
    h2d += int(len(offloaded) * u)
    recomputed = [i for i in range(first, n_blocks) if i not in kept and mem.gradient_checkpointing]
    forward = flux_forward_flops(model_config, resolution=(width, height), batch_size=batch,
                                 text_tokens=text_tokens, rank=rank, targets=targets)
    step_flops = 2 * forward + forward * len(recomputed) // n_blocks  # backward ≈ forward for frozen layers

    notes = []
    if not fused_attention:
        notes.append(f"no fused attention kernel: {fmt_bytes(attn * u)} of attention probabilities per block")
    if mem.compile_blocks:
        notes.append("torch.compile usually lowers activation memory; the estimate does not count on it")
    return VramEstimate(
        weights=weights, swap_slots=slots, lora=lora, grads=grads, optimizer=opt, activations=activations,
        transient=transient, overhead=_CUDA_OVERHEAD if device_type == "cuda" else 0,
        blocks_swapped=len(swapped), blocks_total=len(blocks), tokens=tokens, resolution=(width, height),
        batch_size=batch, notes=notes, device_type=device_type, h2d_bytes=h2d, step_flops=step_flops,
        h2d_gb_per_s=h2d_gb_per_s, gpu_tflops=gpu_tflops,
    )


def flux_forward_flops(model_config: dict | None = None, *, resolution: int | tuple[int, int] = 1024,
                       batch_size: int = 1, text_tokens: int = 512, rank: int = 0, targets: str = "attention") -> int:
    """Forward FLOPs of one FLUX call: 2·MACs of every linear layer on its tokens, plus attention (QKᵀ and AV)."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    model = _meta_model(model_config)
    image, text = _image_tokens(_family(model_config), width, height), text_tokens
    tokens = image + text
    d = model.inner_dim
    flops = 0
    for block in model.transformer_blocks:
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear):
                if name.startswith(("norm1.", "norm1_context.")):
                    rows = 1  # modulation: one row per sample
                elif name.startswith(("attn.add_", "attn.to_add_out", "ff_context.")):
                    rows = text
                else:
                    rows = image
                flops += 2 * rows * m.in_features * m.out_features
        flops += 4 * tokens * tokens * d
    for block in model.single_transformer_blocks:
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear):
                rows = 1 if name.startswith("norm.") else tokens
                flops += 2 * rows * m.in_features * m.out_features
        flops += 4 * tokens * tokens * d
    rows_outside = {"x_embedder": image, "proj_out": image, "context_embedder": text}  # the rest: one row
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            flops += 2 * rows_outside.get(name, 1) * m.in_features * m.out_features
    if rank:
        lora_macs = sum(rank * (m.in_features + m.out_features) for m in _targeted_linears(model, targets))
        flops += 2 * tokens * lora_macs  # approximate: every LoRA layer on all tokens
    return batch_size * flops


@dataclass
class HostRamEstimate:
    """Host RAM a run needs on top of the process itself, phase by phase (bytes)."""

    base: int  # the trainer's copy of the frozen base while training: all of it on a CPU run, else swapped blocks
    pinned_blocks: int  # of which swapped blocks in page-locked memory (the only host copy of those blocks)
    load_peak: int  # while the base loads: final resident base + one block in the compute dtype (streamed); on a
    # shared base, what is made beside it: copied weights and the plan's storage conversion
    pinned_activations: int  # checkpointed block inputs offloaded to page-locked memory
    training: int  # LoRA, gradients, optimizer state and activations, when training on the CPU
    text_encoders: int  # while caching (and while training when they stay live)
    text_encoders_live: bool = False
    shared_base: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def phases(self) -> dict[str, int]:
        live = self.text_encoders if self.text_encoders_live else 0
        return {
            "caching": self.text_encoders,
            "loading the base": self.load_peak + live,
            "training": self.base + self.pinned_activations + self.training + live,
        }

    @property
    def total(self) -> int:
        return max(self.phases.values())

    def summary(self) -> str:
        phase, peak = max(self.phases.items(), key=lambda kv: kv[1])
        if self.shared_base and not self.pinned_blocks:
            base = "shared with ComfyUI's MODEL (no copy)"
        elif self.shared_base:
            base = f"shared with ComfyUI's MODEL, + {fmt_bytes(self.pinned_blocks)} swapped blocks pinned"
        elif not self.base:
            base = "none (every block moves to the GPU after loading)"
        else:
            base = fmt_bytes(self.base) + (f", of which {fmt_bytes(self.pinned_blocks)} swapped blocks pinned"
                                           if self.pinned_blocks else "")
        rows = [
            ("base copy while training", base),
            ("preparing the base (copies and conversions beside ComfyUI's)" if self.shared_base else
             "loading the base (streamed, peak)", fmt_bytes(self.load_peak) if self.load_peak else ""),
            ("offloaded activations (pinned)", fmt_bytes(self.pinned_activations) if self.pinned_activations else ""),
            ("training on the CPU (LoRA, optimizer, activations)", fmt_bytes(self.training) if self.training else ""),
            ("text encoders" + (" (kept for training)" if self.text_encoders_live else " (while caching)"),
             fmt_bytes(self.text_encoders) if self.text_encoders else ""),
        ]
        lines = [f"host RAM estimate: {fmt_bytes(peak)} peak ({phase})"]
        lines += [f"  {name}: {value}" for name, value in rows if value]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate_host_ram(vram: VramEstimate, model_config: dict | None, mem: MemoryConfig, *, compute_dtype: str = "bf16",
                      text_encoder_bytes: int = 0, text_encoders_live: bool = False,
                      shared_base: bool = False, copied_base_bytes: int = 0) -> HostRamEstimate:
    """Host RAM of the plan ``vram`` was estimated for (its ``device_type`` says where training runs).

    ``text_encoder_bytes``: the loaded text encoders (and VAE) — held while caching, and throughout when
    ``text_encoders_live`` (text-encoder LoRA, shuffled tags); ``shared_base``: the trainer works on tensors
    someone else already holds (ComfyUI's MODEL in host RAM), so the base itself costs nothing extra — only
    ``copied_base_bytes`` (the weights it had to copy: LoRA-patched, quantized or in another dtype), the block
    linears converted to another storage precision while the plan is applied (before they move to the GPU), and
    the swapped blocks' pinned packs. The latent cache is read from disk one batch at a time and is not counted.
    """
    model = _meta_model(model_config)
    cb = DTYPE_BYTES[compute_dtype]
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    swapped = spread(mem.blocks_to_swap, len(blocks))
    outside = sum(p.numel() for name, p in model.named_parameters()
                  if not name.startswith(("transformer_blocks.", "single_transformer_blocks."))) * cb
    stored = [block_bytes(b, mem.base_precision, cb) for b in blocks]
    whole = outside + sum(stored)
    pinned = sum(_swap_block_bytes(blocks[i], mem.base_precision, cb) for i in swapped)
    on_cpu = vram.device_type != "cuda"
    u = vram.batch_size * vram.tokens * model.inner_dim * cb
    offloaded = 0
    if not on_cpu and mem.offload_activations and mem.gradient_checkpointing:
        offloaded = int(len(blocks) * u)  # one block input per checkpointed block, at most
    biggest_block = max(block_bytes(b, "auto", cb) for b in blocks)
    notes = []
    if shared_base:
        # Converting to another storage precision makes new tensors beside ComfyUI's (a copied weight is replaced by
        # its conversion instead, so only the shared share adds); they leave host RAM as they move to the GPU.
        in_compute = outside + sum(block_bytes(b, "auto", cb) for b in blocks)
        converts = block_bytes(blocks[0], mem.base_precision, cb) != block_bytes(blocks[0], "auto", cb)
        shared_share = max(0.0, 1.0 - copied_base_bytes / in_compute)
        load_peak = int(copied_base_bytes + (sum(stored) * shared_share if converts else 0))
        base = load_peak if on_cpu else pinned  # on a GPU only the swapped blocks' pinned packs stay
        notes.append("the base is ComfyUI's own copy; training adds no second one"
                     + (f" (it copies {fmt_bytes(copied_base_bytes)} of LoRA-patched, quantized or other-dtype "
                        "weights)" if copied_base_bytes else ""))
    else:
        base = vram.weights + pinned if on_cpu else pinned
        load_peak = whole + biggest_block
    training = (vram.total - vram.weights) if on_cpu else 0
    return HostRamEstimate(base=base, pinned_blocks=0 if on_cpu else pinned, load_peak=load_peak,
                           pinned_activations=offloaded, training=training, text_encoders=text_encoder_bytes,
                           text_encoders_live=text_encoders_live, shared_base=shared_base, notes=notes)
