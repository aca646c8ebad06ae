"""What the benchmark runs: a random-weight FLUX, a synthetic latent cache, our training step and the
plain diffusers + peft baseline step. Both read the same real ``LatentCache`` (random latents and embeddings
written by the data pipeline). Each row of the table is measured in its own process (``measure``)."""

from __future__ import annotations

import math
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

GiB = 2**30


# ----- model and data -----

MODELS = ("flux1-dev", "flux2-klein-4b", "flux2-klein-9b", "flux2-dev", "tiny", "tiny-flux2")
TINY_MODELS = ("tiny", "tiny-flux2")  # for a dry run of the benchmark's code on the CPU


def model_config(name: str) -> dict:
    """The diffusers config of a model of :data:`MODELS` (the full-size configs without their ``_`` metadata)."""
    if name == "tiny":
        from trainer_core.models.tiny import tiny_flux_config

        return tiny_flux_config()
    if name == "tiny-flux2":
        from trainer_core.models.flux2 import tiny_flux2_config

        return tiny_flux2_config("klein")
    from trainer_core.models.flux import FLUX_CONFIGS, flux_config
    from trainer_core.models.flux2 import flux2_config

    config = flux_config(name) if name in FLUX_CONFIGS else flux2_config(name)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def text_tokens(name: str) -> int:
    """Text tokens per caption: 512 as the full-size models' encoders pad to; 16 for the tiny models."""
    return 16 if name in TINY_MODELS else 512


def random_flux(config: dict, device: str | torch.device = "cpu", dtype=torch.bfloat16, seed: int = 0):
    """A transformer of ``config``'s family with random weights (no download): linears N(0, 1/fan_in),
    modulation 10× smaller, so a deep stack stays finite; filled on the GPU when there is one (up to 32 B
    values), then placed on ``device``."""
    from trainer_core.models.family import detect_family

    with torch.device("meta"):
        model = detect_family(config).model_class()(**config).to(dtype)
    model = model.to_empty(device=device)
    fill = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(fill).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)  # RMSNorm scales
            else:
                # modulation: FLUX.1's norm*.linear, FLUX.2's global *_modulation.linear; both have norm_out.linear
                modulation = ".norm" in name or name.startswith("norm") or "modulation" in name
                std = (0.1 if modulation else 1.0) / math.sqrt(p.shape[1])
                p.copy_(torch.empty(p.shape, device=fill, dtype=p.dtype).normal_(0, std, generator=gen))
    if fill.type == "cuda":
        torch.cuda.empty_cache()  # the fill's buffers are not the row's: keep them out of its reserved peak
    return model.train()


class _RandomImageEncoder:
    """Stands in for the VAE: seeded random model-space latents in the family's layout (FLUX.1: 16 channels at /8;
    FLUX.2: 128 at /16, the VAE's 32 channels pixel-shuffled 2×2)."""

    def __init__(self, family):
        self.family = family
        self.latent_channels, self.latent_downscale = family.latent_channels, family.latent_downscale
        self.identity = f"bench-random-latents/{self.latent_channels}x{self.latent_downscale}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        return torch.randn(b, *self.family.latent_shape(h, w), generator=torch.Generator().manual_seed(h * w))


class _RandomTextEncoder:
    """Stands in for the text encoders: seeded random embeddings of the right shape, hidden states in bf16 as
    ComfyUI's. FLUX.1: T5 states + a CLIP-L pooled vector; FLUX.2: three stacked hidden layers, no pooled
    vector (``[B, 0]``)."""

    def __init__(self, tokens: int, dim: int, pooled: int):
        self.shape = (tokens, dim, pooled)
        self.identity = f"bench-random-text/{tokens}x{dim}+{pooled}"

    def encode(self, captions):
        tokens, dim, pooled = self.shape
        g = torch.Generator().manual_seed(len(captions))
        return (torch.randn(len(captions), tokens, dim, generator=g).to(torch.bfloat16),
                torch.randn(len(captions), pooled, generator=g))


def synthetic_cache(folder, resolution: int, config: dict, items: int = 4, text_tokens: int = 512):
    """A real ``LatentCache`` (built by the data pipeline) of random images and random embeddings shaped for the
    transformer of ``config`` (its family's latents, its text width, FLUX.1's pooled vector)."""
    from trainer_core.config import DatasetConfig
    from trainer_core.data.cache import build_cache
    from trainer_core.data.dataset import dataset_from_images
    from trainer_core.models.family import detect_family

    images = torch.rand(items, resolution, resolution, 3, generator=torch.Generator().manual_seed(0))
    entries = dataset_from_images(images, [f"benchmark image {i}" for i in range(items)],
                                  DatasetConfig(resolutions=[resolution]))
    text = _RandomTextEncoder(text_tokens, config["joint_attention_dim"], config.get("pooled_projection_dim", 0))
    return build_cache(entries, _RandomImageEncoder(detect_family(config)), text, folder)


# ----- the two steps -----

def our_step(model, cache, mem, *, rank: int, device, compute_dtype: str, optimizer: str, batch_size: int = 1):
    """The real trainer: ``trainer_core.train.TrainingSession.step`` (the single import of our path)."""
    from trainer_core import memory
    from trainer_core.config import LoraConfig, TrainConfig
    from trainer_core.train import TrainingSession

    train = TrainConfig(steps=10_000, learning_rate=1e-4, batch_size=batch_size, optimizer=optimizer,
                        compute_dtype=compute_dtype, checkpoint_every=0)
    train = memory.effective_train_config(train, mem)
    session = TrainingSession(model, cache, LoraConfig(rank=rank, alpha=rank, targets="attention"), train, mem, device)
    return session.step, session.close


class BaselineLoop:
    """The diffusers reference recipes (train_dreambooth_lora_flux.py, …_flux2.py) written plainly: base in the
    compute dtype, peft LoRA in the same dtype, diffusers' gradient checkpointing, autocast, AdamW, clipping at 1.0.
    Targets are the same layers as ours (the family's "attention"), so both do the same arithmetic; packing, ids
    and the transformer call are the family's (trainer_core.models.family), as the recipes do them."""

    def __init__(self, model, cache, *, rank: int, device, dtype, checkpointing: bool):
        from peft import LoraConfig

        from trainer_core.lora import resolve_targets
        from trainer_core.models.family import detect_family

        self.device, self.dtype, self.cache = torch.device(device), dtype, cache
        self.family = detect_family(model)
        self.model = model.to(self.device, dtype)
        self.model.requires_grad_(False)
        self.model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                          target_modules=resolve_targets("attention", self.model)))
        if checkpointing:
            self.model.enable_gradient_checkpointing()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.generator = torch.Generator().manual_seed(0)
        self.index = 0

    def step(self) -> float:
        family = self.family
        x0 = self.cache.latent(self.index % len(self.cache))[None].to(self.device, self.dtype)
        hidden, pooled = (t[None].to(self.device, self.dtype) for t in self.cache.text(0))
        self.index += 1
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device, self.dtype)
        sigma = torch.sigmoid(torch.randn(1, generator=self.generator)).to(self.device)
        x_t = ((1 - sigma) * x0 + sigma * noise).to(self.dtype)
        _, _, h, w = x0.shape
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = family.call_transformer(
                self.model, family.pack_latents(x_t), sigma.to(self.dtype), hidden, pooled,
                family.image_ids(h, w, device=self.device), family.text_ids(hidden.shape[1], device=self.device),
                1.0, self.dtype)
        loss = F.mse_loss(family.unpack_latents(pred.float(), h, w), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


# ----- measurement -----

@dataclass
class RowSpec:
    label: str
    kind: str  # "ours", "baseline", or "pair" (both, steps alternating)
    resolution: int
    model: str = "flux1-dev"
    device: str = "cuda"
    preset: str = "none"
    overrides: dict = field(default_factory=dict)
    cap_gib: float = 0.0  # cap the process's VRAM (a card of that size)
    checkpointing: bool = True  # the baseline's
    compute_dtype: str = "bf16"
    rank: int = 16
    warmup: int = 3
    steps: int = 10


def peak_bf16_matmul_tflops(device="cuda", size: int = 8192, iters: int = 50) -> float:
    """Best measured bf16 matmul throughput (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * size**3 * iters / (time.perf_counter() - start) / 1e12)
    return best


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux reports KiB


def measure(spec: RowSpec) -> dict:
    """Build, warm up and time one configuration; runs in a fresh process so peaks are its own.

    kind "pair" (CPU mode) builds our step and the baseline loop side by side and alternates their steps, so
    both see the same machine load.
    """
    torch.manual_seed(0)
    cuda = spec.device == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # steadier timings on a shared CPU; the ratio is what counts
    if cuda and spec.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.cap_gib * GiB / total))
    config = model_config(spec.model)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec.compute_dtype]
    tokens = text_tokens(spec.model)
    folder = tempfile.TemporaryDirectory(prefix="flux-bench-")
    cache = synthetic_cache(folder.name, spec.resolution, config, text_tokens=tokens)
    result = dict(label=spec.label, kind=spec.kind, resolution=spec.resolution, preset=spec.preset)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = []
    if spec.kind in ("ours", "pair"):
        steps.append(_ours(spec, config, cache, dtype, tokens, result))
    if spec.kind in ("baseline", "pair"):
        model = random_flux(config, spec.device, dtype)
        loop = BaselineLoop(model, cache, rank=spec.rank, device=spec.device, dtype=dtype,
                            checkpointing=spec.checkpointing)
        steps.append((loop.step, lambda: None))
        if spec.kind == "baseline":
            result.update(tier="-", knobs=f"{spec.compute_dtype} base + LoRA, "
                          + ("checkpointing, " if spec.checkpointing else "") + "autocast, AdamW", swapped=0)
    times: list[list[float]] = [[] for _ in steps]
    finite = True
    for _ in range(spec.warmup + spec.steps):
        for (step, _close), record in zip(steps, times):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            finite &= math.isfinite(step())
            if cuda:
                torch.cuda.synchronize()
            record.append(time.perf_counter() - start)
    for _step, close in steps:
        close()
    folder.cleanup()
    result.update(seconds=statistics.median(times[0][spec.warmup:]), finite=finite, rss_gib=_rss_gib())
    if spec.kind == "pair":
        result["baseline_seconds"] = statistics.median(times[1][spec.warmup:])
    if cuda:
        result.update(peak_gib=torch.cuda.max_memory_allocated() / GiB,
                      reserved_gib=torch.cuda.max_memory_reserved() / GiB)
    return result


def _ours(spec: RowSpec, config: dict, cache, dtype, text_tokens: int, result: dict):
    from trainer_core import memory

    workload = memory.Workload(config, spec.resolution, 1, spec.rank, "attention", "adamw", text_tokens,
                               spec.compute_dtype)
    free = int(spec.cap_gib * GiB) if spec.cap_gib else None
    mem = memory.resolve_preset(spec.preset, {"batch_size": 1, **spec.overrides}, free, workload)
    estimate = workload.estimate(mem)
    model = random_flux(config, "cpu", dtype)
    result.update(tier=mem.preset, knobs=_knobs(mem), estimate_gib=estimate.total / GiB,
                  swapped=min(mem.blocks_to_swap, estimate.blocks_total))
    return our_step(model, cache, mem, rank=spec.rank, device=spec.device, compute_dtype=spec.compute_dtype,
                    optimizer="adamw")


def _knobs(mem) -> str:
    parts = [f"{mem.base_precision if mem.base_precision != 'auto' else 'compute-dtype'} base"]
    if mem.blocks_to_swap:
        parts.append(f"swap {mem.blocks_to_swap}")
    if mem.gradient_checkpointing:
        parts.append("checkpointing")
    if mem.offload_activations:
        parts.append("activations→host")
    if mem.compile_blocks:
        parts.append("compile")
    parts.append(mem.optimizer or "adamw")
    return ", ".join(parts)


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import diffusers

    parts = [f"CPU {cpu} ({torch.get_num_threads()} threads)"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        parts.insert(0, f"GPU {props.name} ({props.total_memory / GiB:.0f} GiB)")
    parts.append(f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)
