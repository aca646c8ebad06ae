"""Memory presets: named VRAM tiers, ``auto``, the fit check, and the time/cost estimate.

Each tier is a set of knobs sized for FLUX.1-dev at up to 1024² (rank 16, attention targets, 512 T5
tokens) on a card of that size, leaving room for the CUDA context and allocator slack. Estimated peaks at
1024² / 512² (``estimate_vram``) are in the table:

| tier | base | blocks swapped | checkpointing (blocks) | activations | compile | batch | optimizer | ≈ peak 1024² / 512² |
|------|------|----------------|------------------------|-------------|---------|-------|-----------|---------------------|
| 8gb  | fp8  | 45 of 57       | all 57                 | host RAM    | no      | 1     | adamw8bit | 4.3 / 3.7 GiB       |
| 12gb | fp8  | 26 of 57       | all 57                 | GPU         | no      | 1     | adamw8bit | 9.3 / 7.8 GiB       |
| 16gb | fp8  | 10 of 57       | all 57                 | GPU         | no      | 1     | adamw8bit | 12.5 / 11.0 GiB     |
| 24gb | fp8  | 0              | 39 (last 18 keep theirs) | GPU       | no      | 1     | adamw     | 18.9 / 14.0 GiB     |
| 48gb | bf16 | 0              | 13 (last 44 keep theirs) | GPU       | yes     | 1     | adamw     | 37.7 / 27.6 GiB     |
| 80gb | bf16 | 0              | none                   | GPU         | yes     | 2     | adamw     | 61.6 / 35.5 GiB     |

These are FLUX.1's tiers. Other families size the same tier names for their models (``ModelFamily.memory_presets``;
FLUX.2 klein-4B, klein-9B and dev each have their own, see ``models/flux2.py``): a tier names the card, and the plan
that fits it depends on the model. LoRA master weights are fp32 in every tier. ``auto`` takes the largest tier whose estimate fits the free
VRAM (or ``vram_budget_gb``) for the actual resolution, batch, rank and targets; for a tier that swaps blocks
it then takes the same tier with an nf4 base and the fewest swapped blocks that fit instead, when that plan's
step-time floor (transfers at ``H2D_GB_PER_S`` vs FLOPs at ``GPU_TFLOPS``, see ``VramEstimate.bound``) is lower.
Any knob set explicitly overrides the tier's value (and is never traded away).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..config import LoraConfig, MemoryConfig, TrainConfig
from ..errors import TrainerInputError
from .estimate import GPU_TFLOPS, H2D_GB_PER_S, GiB, HostRamEstimate, VramEstimate, estimate_vram

log = logging.getLogger(__name__)

_SWAP = dict(base_precision="fp8", gradient_checkpointing=True, uncheckpointed_blocks=0, compile_blocks=False,
             batch_size=1, optimizer="adamw8bit")
PRESET_TABLE: dict[str, dict] = {
    "8gb": dict(_SWAP, blocks_to_swap=45, offload_activations=True),
    "12gb": dict(_SWAP, blocks_to_swap=26, offload_activations=False),
    "16gb": dict(_SWAP, blocks_to_swap=10, offload_activations=False),
    "24gb": dict(base_precision="fp8", blocks_to_swap=0, gradient_checkpointing=True, uncheckpointed_blocks=18,
                 offload_activations=False, compile_blocks=False, batch_size=1, optimizer="adamw"),
    "48gb": dict(base_precision="bf16", blocks_to_swap=0, gradient_checkpointing=True, uncheckpointed_blocks=44,
                 offload_activations=False, compile_blocks=True, batch_size=1, optimizer="adamw"),
    "80gb": dict(base_precision="bf16", blocks_to_swap=0, gradient_checkpointing=False, uncheckpointed_blocks=0,
                 offload_activations=False, compile_blocks=True, batch_size=2, optimizer="adamw"),
}
TIERS_LARGEST_FIRST = ("80gb", "48gb", "24gb", "16gb", "12gb", "8gb")

# Headroom between the estimate and the VRAM a tier may use: allocator slack and estimate error (±10 %).
FIT_MARGIN = 1.10
FIT_RESERVE = GiB // 4


def free_vram_bytes(device: torch.device | str | None = None) -> int | None:
    """Free memory on the CUDA device (None without one)."""
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device) if device is not None else None)
    return int(free)


def explicit_overrides(mem: MemoryConfig, explicit: Iterable[str] | None = None) -> dict:
    """The knobs a user set: the named fields, or (when unknown) those that differ from the defaults."""
    default = MemoryConfig()
    names = explicit if explicit is not None else [
        f.name for f in dataclasses.fields(MemoryConfig) if getattr(mem, f.name) != getattr(default, f.name)
    ]
    return {name: getattr(mem, name) for name in names if name != "preset"}


@dataclass
class Workload:
    """What the estimate needs besides the memory knobs."""

    model_config: dict | None = None
    resolution: int | tuple[int, int] = 1024
    batch_size: int = 1
    rank: int = 16
    targets: str = "attention"
    optimizer: str = "adamw"
    text_tokens: int = 512
    compute_dtype: str = "bf16"
    device_type: str = "cuda"
    fused_attention: bool = True
    h2d_gb_per_s: float = H2D_GB_PER_S
    gpu_tflops: float = GPU_TFLOPS

    @classmethod
    def for_training(cls, model_config: dict, sizes: Sequence[tuple[int, int]], text_tokens: int,
                     lora_cfg: LoraConfig, train_cfg: TrainConfig) -> "Workload":
        """The workload of a run: its largest bucket (``LatentCache.sizes``) and its LoRA/training settings."""
        width, height = max(sizes, key=lambda wh: wh[0] * wh[1])
        return cls(dict(model_config), (width, height), train_cfg.batch_size, lora_cfg.rank, lora_cfg.targets,
                   train_cfg.optimizer, text_tokens, train_cfg.compute_dtype)

    def estimate(self, mem: MemoryConfig) -> VramEstimate:
        return estimate_vram(self.model_config, mem, resolution=self.resolution, batch_size=self.batch_size,
                             rank=self.rank, targets=self.targets, optimizer=self.optimizer,
                             text_tokens=self.text_tokens, compute_dtype=self.compute_dtype,
                             device_type=self.device_type, fused_attention=self.fused_attention,
                             h2d_gb_per_s=self.h2d_gb_per_s, gpu_tflops=self.gpu_tflops)


def fits(estimate: VramEstimate, budget: int) -> bool:
    return estimate.total * FIT_MARGIN + FIT_RESERVE <= budget


def preset_table(model_config: dict | None = None) -> dict[str, dict]:
    """The tiers sized for the family (and size) of ``model_config`` (default FLUX.1-dev): the same names for
    every model, each the plan for that card size — FLUX.2 dev needs far more swapping at 24gb than klein-4B."""
    if model_config is None:
        return PRESET_TABLE
    from ..models.family import detect_family

    return detect_family(model_config).memory_presets(model_config)


def _tier(name: str, overrides: dict, workload: Workload | None = None) -> MemoryConfig:
    table = preset_table(workload.model_config if workload is not None else None)
    return MemoryConfig(**{**table[name], **overrides, "preset": name})


def resolve_preset(name: str, overrides: dict | None = None, free_bytes: int | None = None,
                   workload: Workload | None = None) -> MemoryConfig:
    """Knobs of preset ``name`` ("none", "auto" or a tier) with ``overrides`` applied on top.

    "auto" picks the largest tier whose estimate for ``workload`` (default FLUX.1-dev, 1024², batch 1,
    rank 16) fits ``free_bytes`` (default: the free VRAM detected; ``overrides['vram_budget_gb']`` wins);
    without a GPU it returns the plain defaults.
    """
    overrides = dict(overrides or {})
    overrides.pop("preset", None)
    if name not in MemoryConfig.PRESETS:
        raise TrainerInputError(f"memory.preset: '{name}' is not one of {', '.join(MemoryConfig.PRESETS)}.")
    if name == "none":
        return MemoryConfig(**overrides).validate()
    if name != "auto":
        return _tier(name, overrides, workload).validate()
    budget = int(overrides["vram_budget_gb"] * GiB) if overrides.get("vram_budget_gb") else free_bytes
    if budget is None:
        budget = free_vram_bytes()
    if budget is None:
        log.info("memory.preset auto: no GPU found; using the plain defaults")
        return MemoryConfig(**overrides, preset="none").validate()
    workload = workload or Workload()
    for tier in TIERS_LARGEST_FIRST:
        mem = _tier(tier, overrides, workload)
        try:
            mem.validate()
        except TrainerInputError:
            continue  # an override that contradicts this tier (e.g. checkpointing off with swapping)
        estimate = workload.estimate(mem)
        if fits(estimate, budget):
            mem, estimate = _faster_variant(mem, estimate, overrides, budget, workload)
            log.info("memory.preset auto: %.1f GiB available → tier %s (%s base, %d blocks swapped; %s)",
                     budget / GiB, tier, mem.base_precision, mem.blocks_to_swap, estimate.time_summary())
            return mem
    return _tier(TIERS_LARGEST_FIRST[-1], overrides, workload).validate()


def _faster_variant(mem: MemoryConfig, estimate: VramEstimate, overrides: dict, budget: int,
                    workload: Workload) -> tuple[MemoryConfig, VramEstimate]:
    """A swapping tier, or the same tier with an nf4 base and the fewest swapped blocks that fit, whichever has
    the lower step-time floor: nf4 blocks are half the bytes of fp8 ones, so where the transfers are the bound
    it swaps fewer, smaller blocks. Knobs the user set are never changed."""
    if not mem.blocks_to_swap or {"base_precision", "blocks_to_swap"} & overrides.keys():
        return mem, estimate
    nf4 = lambda swap: dataclasses.replace(mem, base_precision="nf4", blocks_to_swap=swap)  # noqa: E731
    low, high = 0, mem.blocks_to_swap  # fewest swapped blocks that fit: the peak only falls as more are swapped
    if not fits(workload.estimate(nf4(high)), budget):
        return mem, estimate
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(workload.estimate(nf4(middle)), budget) else (middle + 1, high)
    candidate, candidate_estimate = nf4(low), workload.estimate(nf4(low))
    if candidate_estimate.step_floor_seconds < estimate.step_floor_seconds:
        return candidate, candidate_estimate
    return mem, estimate


def check_fits(estimate: VramEstimate, mem: MemoryConfig, budget: int | None, workload: Workload | None = None) -> None:
    """Refuse a configuration whose estimate does not fit ``budget`` bytes, naming what to change."""
    if budget is None or fits(estimate, budget):
        return
    workload = workload or Workload()
    overrides = {k: getattr(mem, k) for k in ("lora_dtype", "prefetch_blocks", "vram_budget_gb")}
    smaller = [t for t in TIERS_LARGEST_FIRST if fits(workload.estimate(_tier(t, overrides, workload)), budget)]
    if smaller:
        fix = f"use memory.preset = \"{smaller[0]}\" (or \"auto\")"
    else:
        w, h = estimate.resolution
        fix = f"lower the resolution (now {w}×{h}) or the batch size (now {estimate.batch_size})"
    knobs = []
    if not mem.gradient_checkpointing:
        knobs.append("gradient_checkpointing = true")
    if mem.base_precision in ("auto", "bf16", "fp32"):
        knobs.append("base_precision = \"fp8\"")
    if estimate.blocks_swapped < estimate.blocks_total:
        knobs.append(f"blocks_to_swap above {estimate.blocks_swapped}")
    if not mem.offload_activations and mem.gradient_checkpointing:
        knobs.append("offload_activations = true")
    raise TrainerInputError(
        f"memory: this run needs about {estimate.total_gib:.1f} GiB of VRAM (+10 % margin) but "
        f"{budget / GiB:.1f} GiB is available. To fit, {fix}"
        + (f", or set {', '.join(knobs)}" if knobs else "") + f".\n{estimate.summary()}"
    )


HOST_MARGIN = 1.10  # estimate error, and the allocator's pages not yet returned to the system
HOST_RESERVE = GiB  # the Python process itself: interpreter, torch and the other libraries, CUDA host buffers


def available_host_bytes() -> int:
    """Host RAM the system can give this process now without swapping (psutil's "available")."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_host_ram(estimate: HostRamEstimate, mem: MemoryConfig, available: int | None = None) -> None:
    """Refuse a plan whose host-RAM estimate does not fit the RAM available, naming the knobs that lower it."""
    available = available_host_bytes() if available is None else available
    need = estimate.total * HOST_MARGIN + HOST_RESERVE
    if need <= available:
        return
    knobs = []
    if estimate.shared_base and estimate.load_peak and mem.base_precision not in ("auto", "bf16", "fp32"):
        # a base shared with ComfyUI: converting it is what costs RAM, not its precision
        knobs.append('memory.base_precision = "auto" (trains on ComfyUI\'s weights as loaded, converting none)')
    elif estimate.phases["loading the base"] >= estimate.phases["training"] or estimate.training:
        if mem.base_precision in ("auto", "bf16", "fp32"):
            knobs.append('memory.base_precision = "fp8" (or "nf4")')
        elif mem.base_precision == "fp8":
            knobs.append('memory.base_precision = "nf4"')
    if estimate.pinned_activations:
        knobs.append("memory.offload_activations = false")
    if estimate.pinned_blocks:
        knobs.append(f"fewer memory.blocks_to_swap (now {mem.blocks_to_swap}; a larger memory.preset tier if the "
                     "VRAM allows)")
    if estimate.text_encoders_live:
        knobs.append('lora.text_encoders = "none" and train.shuffle_tags = false (text encoders then leave RAM '
                     "before training)")
    if estimate.training and not mem.gradient_checkpointing:
        knobs.append("memory.gradient_checkpointing = true")
    if estimate.training:
        knobs.append("a CUDA device (--device cuda)")
    raise TrainerInputError(
        f"memory: this run needs about {(estimate.total * HOST_MARGIN) / GiB:.1f} GiB of host RAM (+10 % margin, "
        f"+{HOST_RESERVE / GiB:.0f} GiB for the process) but {available / GiB:.1f} GiB is available. To fit, "
        + (f"set {', or '.join(knobs)}" if knobs else "close other programs or add RAM/swap")
        + f".\n{estimate.summary()}")


def plan_memory(mem: MemoryConfig, workload: Workload | None = None, *, free_bytes: int | None = None,
                explicit: Iterable[str] | None = None,
                device: torch.device | str | None = None) -> tuple[MemoryConfig, VramEstimate]:
    """Resolve ``mem.preset`` into knobs, estimate the peak, and refuse a plan that will not fit.

    ``explicit``: names of the fields the user set (the rest come from the preset); default: the fields
    that differ from :class:`MemoryConfig`'s defaults. The budget is ``mem.vram_budget_gb`` if set, else
    ``free_bytes``, else the free VRAM detected on ``device`` (no check when training on the CPU). "auto"
    steps down to the largest tier that fits; a named tier or hand-set knobs that do not fit raise
    :class:`TrainerInputError`.
    """
    workload = workload or Workload()
    overrides = explicit_overrides(mem, explicit)
    on_cpu = device is not None and torch.device(device).type != "cuda"
    if on_cpu:
        workload = dataclasses.replace(workload, device_type="cpu")
    if on_cpu and mem.preset == "auto":
        resolved = MemoryConfig(**overrides).validate()  # no VRAM to fit: the plain defaults
    else:
        resolved = resolve_preset(mem.preset, overrides, free_bytes, workload)
    if resolved.batch_size:
        workload = dataclasses.replace(workload, batch_size=resolved.batch_size)
    estimate = workload.estimate(resolved)
    if not on_cpu:
        budget = int(resolved.vram_budget_gb * GiB) if resolved.vram_budget_gb else free_bytes
        if budget is None:
            budget = free_vram_bytes(device)
        check_fits(estimate, resolved, budget, workload)
    return resolved, estimate


def effective_train_config(train: TrainConfig, mem: MemoryConfig) -> TrainConfig:
    """``train`` with the preset's batch size and optimizer where the memory config sets them."""
    changes = {}
    if mem.batch_size:
        changes["batch_size"] = mem.batch_size
    if mem.optimizer:
        changes["optimizer"] = mem.optimizer
    return dataclasses.replace(train, **changes) if changes else train


@dataclass
class TimeEstimate:
    seconds_per_step: float  # median after warm-up
    total_steps: int
    remaining_steps: int
    price_per_gpu_hour: float | None = None

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_step * self.total_steps

    @property
    def remaining_seconds(self) -> float:
        return self.seconds_per_step * self.remaining_steps

    @property
    def cost(self) -> float | None:
        if self.price_per_gpu_hour is None:
            return None
        return self.total_seconds / 3600 * self.price_per_gpu_hour

    def summary(self) -> str:
        text = (f"{self.seconds_per_step:.2f} s/step → {_duration(self.total_seconds)} for {self.total_steps} steps "
                f"({_duration(self.remaining_seconds)} left)")
        if self.cost is not None:
            text += f", ≈ {self.cost:.2f} at {self.price_per_gpu_hour:g} per GPU-hour"
        return text


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def time_estimate(step_seconds: Sequence[float], total_steps: int, done_steps: int | None = None,
                  price_per_gpu_hour: float | None = None, warmup: int = 2) -> TimeEstimate | None:
    """Run time from measured step times (the first ``warmup`` are compile/allocation outliers and skipped).

    None until at least one step after the warm-up has been measured.
    """
    measured = list(step_seconds)[warmup:]
    if not measured:
        return None
    done = len(step_seconds) if done_steps is None else done_steps
    return TimeEstimate(statistics.median(measured), total_steps, max(0, total_steps - done), price_per_gpu_hour)
