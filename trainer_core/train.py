"""The training loop: batch → loss → step, with checkpoints, metrics and validation samples.

It knows nothing of ComfyUI or tqdm: progress, previews and stop requests go through :class:`Callbacks`.
:class:`TrainingSession` holds the model, optimizer and RNG and does one optimizer step at a time (the
benchmark drives it directly); :func:`train_lora` runs a session to the end and writes the LoRA.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError

from . import checkpoint as ckpt
from . import distributed, flow, lora, memory
from .config import EXPORT_FORMATS, LoraConfig, MemoryConfig, SampleConfig, TrainConfig
from .data.cache import LatentCache
from .data.dataset import BatchOrder
from .errors import TrainerInputError, TrainingStopped
from .fileio import ensure_writable_dir, remove_stale_temp_files, safe_output_name
from .metrics import MetricsLog
from .models.family import ModelFamily, detect_family
from .optim import build_optimizer, build_scheduler
from .text_conditioning import TextConditioning

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Settings a resume may change (besides steps and checkpoint cadence): they steer the rest of the run but do not
# change what was trained so far, e.g. a lower learning rate after a divergence stop.
RESUMABLE_CHANGES = ("train.learning_rate", "train.text_encoder_lr", "train.scheduler", "train.warmup_steps",
                     "train.scheduler_cycles", "train.scheduler_power")


@dataclass
class StepInfo:
    step: int  # optimizer steps completed
    total_steps: int
    loss: float
    lr: float
    seconds_per_step: float


class Callbacks:
    """Hooks the caller overrides. Any exception raised from a hook stops training after a checkpoint."""

    def on_step(self, info: StepInfo) -> None:
        pass

    def on_sample(self, step: int, latents: torch.Tensor) -> None:
        """Validation latents (model space, the family's layout: [N, 16, H/8, W/8] FLUX.1, [N, 128, H/16, W/16] FLUX.2)
        every ``sample.every`` steps and at the end."""

    def on_checkpoint(self, path: Path) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainResult:
    lora_path: Path
    losses: list[float]
    steps: int
    resumed_from: int  # step the run resumed at (0 for a fresh run)
    checkpoint: Path | None
    extra_files: list[Path] = field(default_factory=list)  # lora.export_formats and the EMA adapter (if any)


@dataclass
class ValidationPrompts:
    """Encoded validation prompts (hidden [L, D], pooled [P] each) and how to sample them; ``negative`` is the
    encoded ``config.negative_prompt``, which models sampled with real CFG (FLUX.2 klein base) need."""

    embeddings: Sequence[tuple[torch.Tensor, torch.Tensor]]
    config: SampleConfig = field(default_factory=SampleConfig)
    negative: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden, pooled): real-CFG families only


@torch.no_grad()
def sample_validation(transformer, prompts: ValidationPrompts, device, dtype=torch.float32,
                      family: ModelFamily | None = None) -> torch.Tensor:
    """Euler-sample one latent per validation prompt; fixed noise seed, so samples compare across time.

    A transformer its family samples with real CFG (FLUX.2 klein base) is guided against ``prompts.negative`` at
    scale ``sample.guidance`` where that is above 1, as its diffusers pipeline does."""
    cfg = prompts.config
    family = family or detect_family(transformer)
    negative = None
    if family.real_cfg(transformer.config) and cfg.guidance > 1:
        if prompts.negative is None:
            log.warning("validation samples without classifier-free guidance: no negative prompt embedding given")
        else:
            negative = tuple(t[None].to(device) for t in prompts.negative)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    for hidden, pooled in prompts.embeddings:
        noise = torch.randn((1, *family.latent_shape(cfg.height, cfg.width)), generator=gen).to(device)
        latent = flow.euler_sample(transformer, noise, hidden[None].to(device), pooled[None].to(device),
                                   cfg.guidance, cfg.steps, dtype=dtype, family=family, negative=negative)
        out.append(latent.cpu())
    return torch.cat(out)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TrainingSession:
    """A LoRA on a frozen FLUX transformer, its optimizer and RNG: ``step()`` does one optimizer step.

    ``text_encoder`` (a FluxTextEncoder) is needed only to train text-encoder LoRAs, to shuffle caption tags, or
    for caption dropout on a cache without the empty caption.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        cache: LatentCache,
        lora_cfg: LoraConfig,
        train_cfg: TrainConfig,
        mem_cfg: MemoryConfig | None = None,
        device: torch.device | str | None = None,
        text_encoder=None,
    ):
        self.train_cfg = train_cfg.validate()
        self.lora_cfg = lora_cfg.validate()
        self.mem_cfg = mem_cfg or MemoryConfig()  # validated once its preset is resolved (plan_memory)
        if len(cache) == 0:
            raise TrainerInputError("dataset: the cache holds no images; add images to the dataset folder.")
        self.cache = cache
        self.family = detect_family(transformer)
        self.family.check_text_conditioning(transformer.config, *cache.text(0), "cache")
        self.device = torch.device(device) if device is not None else default_device()
        # The preset becomes concrete knobs here, and a plan that will not fit the VRAM is refused before any
        # weight moves; the preset may also set the batch size and optimizer.
        workload = memory.Workload.for_training(dict(transformer.config), cache.sizes, cache.text(0)[0].shape[0],
                                                lora_cfg, train_cfg)
        self.mem_cfg, self.vram_estimate = memory.plan_memory(self.mem_cfg, workload, device=self.device)
        log.info("memory plan (%s): %s", self.mem_cfg.preset, self.vram_estimate.summary())
        self.train_cfg = train_cfg = memory.effective_train_config(train_cfg, self.mem_cfg).validate()
        self.dtype = COMPUTE_DTYPES[train_cfg.compute_dtype]
        self.transformer = memory.prepare_base(transformer, self.mem_cfg, self.dtype)
        self.targets = lora.add_lora(self.transformer, lora_cfg, seed=train_cfg.seed)
        self.memory = memory.prepare_training(self.transformer, self.mem_cfg, self.device)
        # prepare_training casts LoRA A/B; DoRA magnitudes and LoKr/LoHa/OFT tensors follow the same master dtype.
        lora.cast_adapter_parameters(self.transformer, memory.DTYPES[self.mem_cfg.lora_dtype])
        self.text = TextConditioning(cache, text_encoder, lora_cfg, train_cfg, self.device)
        transformer_params, text_params = lora.lora_parameters(self.transformer), self.text.parameters()
        self.params = transformer_params + text_params
        distributed.broadcast_parameters(self.params)  # every process starts from process 0's LoRA, as DDP does
        self.optimizer = build_optimizer([
            {"params": transformer_params},
            {"params": text_params, "lr": train_cfg.text_encoder_lr or train_cfg.learning_rate},
        ], train_cfg)
        self.scheduler = build_scheduler(self.optimizer, train_cfg)
        self.ema = EMAModel(self.params, decay=train_cfg.ema_decay) if train_cfg.ema_decay else None
        # On N processes (distributed.setup) each one trains on its shard of the global batch; on one, the shard
        # is the whole batch.
        self.processes = distributed.world_size()
        self.order = BatchOrder(cache.sizes, train_cfg.batch_size, cache.repeats, train_cfg.seed, self.processes)
        self.shard = self.order.shard(distributed.rank())
        log.info("global batch %d = %d per process × %d process(es) × %d accumulation; %d steps per epoch",
                 self.order.batch_size * train_cfg.gradient_accumulation, train_cfg.batch_size, self.processes,
                 train_cfg.gradient_accumulation, math.ceil(self.order.batches_per_epoch
                                                            / train_cfg.gradient_accumulation))
        distributed.check_same(self.fingerprint(), "training settings")
        # Noise and σ come from a private CPU generator, so runs match across devices and resume exactly.
        self.generator = torch.Generator().manual_seed(train_cfg.seed)
        self.step_count = 0
        self.transformer.train()  # FLUX has no dropout; nf4 layers must never see eval() (reference.md §2)

    def _batch(self, micro_index: int):
        """This process's shard of micro-batch ``micro_index`` and the size of the global batch."""
        indices = self.order.batch(micro_index)
        mine = indices[self.shard]
        x0 = torch.stack([self.cache.latent(i) for i in mine]).float()
        hidden, pooled = self.text.batch(indices, self.generator, self.shard)
        weight = None
        if self.cache.has_masks:  # items without a mask train on every latent cell
            masks = [self.cache.mask(i) for i in mine]
            # masks are cached per 8×8 pixel cell; a coarser latent (FLUX.2: /16) averages them over its cells
            weight = torch.stack([torch.nn.functional.adaptive_avg_pool2d(m.float(), x0.shape[-2:]) if m is not None
                                  else torch.ones(1, *x0.shape[-2:]) for m in masks]).float()
        return len(indices), x0, hidden, pooled, weight

    def step(self) -> float:
        """One optimizer step over ``gradient_accumulation`` micro-batches; returns the mean loss.

        Raises TrainingStopped before touching the weights if the loss is not finite. Anything that stops the step
        before the optimizer moves the weights (that, an error, a second Ctrl+C) rolls the RNGs and gradients back
        to the step's start, so a checkpoint saved then resumes exactly.
        """
        cfg = self.train_cfg
        rng_at_start = self.generator.get_state(), torch.get_rng_state()
        try:
            total = self._accumulate(cfg)
            # The mean over processes of equal shards is the global batch's mean (masked losses aside: each shard
            # is normalised by its own mask area, as each micro-batch of an accumulation is). All processes then see
            # the same loss, so a non-finite one stops them all at this step.
            (total,) = distributed.average_gradients(self.params, total)
            if not math.isfinite(total):
                raise TrainingStopped(f"loss became {total} at step {self.step_count + 1}")
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            self.generator.set_state(rng_at_start[0])
            torch.set_rng_state(rng_at_start[1])
            raise
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        self.step_count += 1
        return total

    def _accumulate(self, cfg: TrainConfig) -> float:
        """Forward and backward over the step's micro-batches (this process's shard of each); returns the mean loss."""
        accum = cfg.gradient_accumulation
        total = 0.0
        for j in range(accum):
            size, x0, hidden, pooled, weight = self._batch(self.step_count * accum + j)
            # Every process draws the noise and σ of the whole global batch and keeps its shard: the numbers one
            # process with the global batch draws, and the generators stay in step.
            noise = torch.randn((size, *x0.shape[1:]), generator=self.generator)[self.shard]
            sigma = flow.sample_sigmas(
                size, cfg.timestep_sampling, self.family.image_token_count(*x0.shape[-2:]), self.generator,
                mean=cfg.sigmoid_mean, std=cfg.sigmoid_std, scale=cfg.sigmoid_scale, shift=cfg.shift,
                family=self.family,
            )[self.shard]
            x0, noise, sigma = (t.to(self.device) for t in (x0, noise, sigma))
            loss = flow.flow_matching_loss(
                self.transformer, x0.to(self.dtype), noise.to(self.dtype), sigma, hidden.to(self.device),
                pooled.to(self.device), cfg.guidance, loss_type=cfg.loss_type,
                weight=weight.to(self.device) if weight is not None else None, dtype=self.dtype, huber_c=cfg.huber_c,
                family=self.family,
            )
            (loss / accum).backward()
            total += loss.item() / accum
        return total

    def weights_finite(self) -> bool:
        flags: dict[torch.device, list[torch.Tensor]] = {}  # one GPU sync per device, not one per tensor
        for param in self.params:
            flags.setdefault(param.device, []).append(torch.isfinite(param).all())
        return all(bool(torch.stack(group).all()) for group in flags.values())

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def fingerprint(self) -> dict[str, Any]:
        """Settings that must not change across a resume (steps may grow; checkpointing may change)."""
        train = dataclasses.asdict(self.train_cfg)
        for free in ("steps", "checkpoint_every", "keep_checkpoints"):
            train.pop(free)
        lora_settings = dataclasses.asdict(self.lora_cfg)
        lora_settings.pop("export_formats")  # which files are written at the end does not change training
        return {
            "lora": lora_settings,
            "train": train,
            "data": self.cache.fingerprint,
            "targets": len(self.targets),
            "processes": self.processes,  # the global batch and the data shards depend on it
        }

    def state(self, losses: list[float]) -> ckpt.TrainingState:
        return ckpt.TrainingState(
            step=self.step_count,
            lora=lora.training_state_dict(self.transformer, self.text.trained),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng={"generator": self.generator.get_state(), "torch": torch.get_rng_state()},
            losses=list(losses),
            fingerprint=self.fingerprint(),
            ema=self._ema_state(),
        )

    def _ema_state(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            return {}
        state = {str(i): t.detach().float().cpu() for i, t in enumerate(self.ema.shadow_params)}
        state["optimization_step"] = torch.tensor(self.ema.optimization_step)
        return state

    def load_state(self, state: ckpt.TrainingState) -> None:
        lora.set_lora_state_dict(self.transformer, state.lora, self.text.trained)
        if self.ema is not None:
            with torch.no_grad():
                for i, shadow in enumerate(self.ema.shadow_params):
                    shadow.copy_(state.ema[str(i)])
            self.ema.optimization_step = int(state.ema["optimization_step"])
        configured_lrs = list(self.scheduler.base_lrs)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if type(self.scheduler) is torch.optim.lr_scheduler.LambdaLR:  # not Adafactor's self-schedule
            # The learning rate and schedule may change on resume (RESUMABLE_CHANGES): the restored step count
            # continues under the current settings, whose schedule functions the scheduler already holds.
            self.scheduler.base_lrs = configured_lrs
            for group, base, factor in zip(self.optimizer.param_groups, configured_lrs, self.scheduler.lr_lambdas):
                group["initial_lr"] = base
                group["lr"] = base * factor(self.scheduler.last_epoch)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.generator.set_state(state.rng["generator"])
        torch.set_rng_state(state.rng["torch"])
        self.step_count = state.step

    def sample(self, prompts: ValidationPrompts) -> torch.Tensor:
        return sample_validation(self.transformer, prompts, self.device, self.dtype, self.family)

    def close(self) -> None:
        self.memory.close()


def train_lora(
    transformer: torch.nn.Module,
    cache: LatentCache,
    *,
    lora_cfg: LoraConfig,
    train_cfg: TrainConfig,
    output_dir: Path,
    output_name: str,
    mem_cfg: MemoryConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_root: Path | None = None,
    metrics_path: Path | None = None,
    validation: ValidationPrompts | None = None,
    metadata: dict[str, Any] | None = None,
    callbacks: Callbacks | None = None,
    device: torch.device | str | None = None,
    text_encoder=None,
) -> TrainResult:
    """Train a LoRA to ``train_cfg.steps`` and write ``output_dir/<output_name>.safetensors``.

    Also written: ``<name>_<format>.safetensors`` per ``lora_cfg.export_formats`` and, with ``train_cfg.ema_decay``,
    the EMA weights as ``<name>_ema[_<format>].safetensors``. ``text_encoder``: see :class:`TrainingSession`.

    Checkpoints go to ``checkpoint_root/<name>`` (default root ``output_dir/checkpoints``) every
    ``checkpoint_every`` steps, and on interrupt or error (then the exception is re-raised). With
    ``resume`` the newest checkpoint there is continued exactly. A fresh run never reuses the name of an
    earlier LoRA or of an earlier run's checkpoints: it takes ``<name>_001`` and so on.

    On N processes (:func:`distributed.setup`) every process calls this with the same arguments; process 0 alone
    writes files (LoRA, checkpoints, metrics) and samples; the others get the same :class:`TrainResult`.
    """
    callbacks = callbacks or Callbacks()

    def prepare_folders() -> tuple[Path, str, Path, Path]:
        out = ensure_writable_dir(Path(output_dir), "output folder")
        root = Path(checkpoint_root or out / "checkpoints")
        name = run_name(out, root, safe_output_name(output_name), resume, overwrite)
        checkpoint_dir = ensure_writable_dir(root / name, "checkpoint folder")
        metrics_file = Path(metrics_path or checkpoint_dir / "metrics.jsonl")
        if not resume:
            metrics_file.unlink(missing_ok=True)
            for old in ckpt.list_checkpoints(checkpoint_dir):  # only non-empty when overwrite was asked for
                old.unlink()
        # A save killed mid-write leaves its temporary file behind. The checkpoint folder is this run's alone; in
        # the output folder only this run's own LoRA names are cleaned.
        remove_stale_temp_files(checkpoint_dir)
        remove_stale_temp_files(out, [_adapter_file_name(stem, fmt) for stem in (name, f"{name}_ema")
                                      for fmt in ("default", *EXPORT_FORMATS)])
        return out, name, checkpoint_dir, metrics_file

    output_dir, name, checkpoint_dir, metrics_path = distributed.on_main(prepare_folders)
    metrics = MetricsLog(metrics_path) if distributed.is_main() else None

    # Nodes run under inference mode (reference.md §3); training needs autograd whatever the caller did.
    with torch.inference_mode(False), torch.enable_grad():
        session = TrainingSession(transformer, cache, lora_cfg, train_cfg, mem_cfg, device, text_encoder)
        try:
            with distributed.stop_signals():
                return _run(session, callbacks, metrics, output_dir, name, checkpoint_dir, resume, overwrite,
                            validation, metadata or {})
        finally:
            session.close()


def run_name(output_dir: Path, checkpoint_root: Path, name: str, resume: bool, overwrite: bool) -> str:
    """The run's file stem: ``name`` when resuming or overwriting, else the first free ``name[_NNN]``."""
    if resume or overwrite:
        return name
    stem, n = name, 0
    while (output_dir / f"{stem}.safetensors").exists() or ckpt.list_checkpoints(checkpoint_root / stem):
        n += 1
        stem = f"{name}_{n:03d}"
    if stem != name:
        log.info("'%s' is taken by an earlier LoRA or run; this run is named '%s'", name, stem)
    return stem


def _run(session: TrainingSession, callbacks: Callbacks, metrics: MetricsLog | None, output_dir: Path, name: str,
         checkpoint_dir: Path, resume: bool, overwrite: bool, validation: ValidationPrompts | None,
         metadata: dict[str, Any]) -> TrainResult:
    cfg = session.train_cfg
    losses: list[float] = []
    resumed_from = 0
    if resume:
        # Process 0 picks the checkpoint; every process reads it (nothing is written before they all have).
        path = distributed.on_main(ckpt.latest_checkpoint, checkpoint_dir)
        if path is None:
            log.info("resume: no checkpoint in %s, starting at step 0", checkpoint_dir)
        else:
            state = ckpt.load_checkpoint(path)
            changes = ckpt.check_fingerprint(state.fingerprint, session.fingerprint(), path, RESUMABLE_CHANGES)
            if changes:
                log.info("resume: continuing with changed settings: %s", "; ".join(changes))
            session.load_state(state)
            losses = state.losses
            resumed_from = state.step
            log.info("resumed from %s at step %d", path, state.step)
        if metrics:
            metrics.resume_at(resumed_from)

    last_checkpoint: Path | None = None

    def save_checkpoint() -> Path:
        """Written by process 0; every process holds the same state, so its file is everyone's checkpoint."""
        nonlocal last_checkpoint
        if distributed.is_main():
            last_checkpoint = ckpt.save_checkpoint(checkpoint_dir, session.state(losses), cfg.keep_checkpoints)
            callbacks.on_checkpoint(last_checkpoint)
        else:
            last_checkpoint = ckpt.checkpoint_path(checkpoint_dir, session.step_count)
        return last_checkpoint

    main = distributed.is_main()
    started = time.perf_counter()
    try:
        while session.step_count < cfg.steps:
            # On N processes a stop (a callback's, Ctrl+C between steps, or Ctrl+C / SIGTERM passed on by the
            # launcher) is agreed first, so all of them stop at the same step.
            if distributed.any_process(callbacks.should_stop() or distributed.stop_signalled()):
                if distributed.stop_signalled() and distributed.world_size() == 1:
                    raise KeyboardInterrupt  # Ctrl+C on the CLI: the caller reports the resumable checkpoint
                raise TrainingStopped(f"stopped at step {session.step_count} on request")
            t0 = time.perf_counter()
            loss = session.step()
            if not session.weights_finite():
                raise TrainingStopped(f"the LoRA weights became non-finite at step {session.step_count}")
            losses.append(loss)
            if metrics:
                metrics.append({"step": session.step_count, "loss": loss, "lr": session.lr})
            callbacks.on_step(StepInfo(session.step_count, cfg.steps, loss, session.lr, time.perf_counter() - t0))
            if cfg.checkpoint_every and session.step_count % cfg.checkpoint_every == 0 and session.step_count < cfg.steps:
                save_checkpoint()
            if main and validation and validation.config.every and session.step_count % validation.config.every == 0:
                callbacks.on_sample(session.step_count, session.sample(validation))
    except BaseException as exc:
        # Interrupt, error or divergence: keep the weights of the last completed step, unless they are not finite —
        # those are never saved, so the newest checkpoint on disk is the last finite one.
        finite = session.weights_finite()
        if finite and (session.step_count > resumed_from or last_checkpoint is None):
            path = save_checkpoint()
        else:
            path = last_checkpoint if finite else ckpt.latest_checkpoint(checkpoint_dir)
        if isinstance(exc, TrainingStopped):
            # Every process raised this one at the same step (agreed stop, or the averaged loss): the others wait
            # for process 0's checkpoint, or the launcher, seeing them exit, would kill it mid-write.
            distributed.barrier()
        log.warning("training stopped at step %d (%s); resumable checkpoint: %s", session.step_count,
                    str(exc) or type(exc).__name__, path)
        if isinstance(exc, TrainingStopped):
            raise TrainingStopped(_stop_message(exc, path, finite), checkpoint=path) from exc
        raise

    elapsed = time.perf_counter() - started
    meta = {
        **{k: str(v) for k, v in metadata.items()},
        "trainer": "flux-lora-trainer",
        "modelspec.architecture": session.family.lora_architecture(session.transformer.config),
        "rank": str(session.lora_cfg.rank),
        "alpha": str(session.lora_cfg.alpha),
        "targets": session.lora_cfg.targets,
        "steps": str(session.step_count),
        "dataset_hash": session.cache.fingerprint,
        "training_settings": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
    }

    def save_outputs() -> tuple[Path, list[Path], Path]:
        # The checkpoint first: if the LoRA cannot be written (a full disk, which no check beforehand can know),
        # the finished run is kept and a resume writes the LoRA without training again.
        final_checkpoint = save_checkpoint()
        try:
            lora_path, extra_files = _save_adapters(session, output_dir, name, meta, overwrite)
        except (OSError, SafetensorError) as exc:
            reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
            raise TrainingStopped(
                f"could not write the LoRA to '{output_dir}' ({reason}); the finished run is kept in checkpoint "
                f"'{final_checkpoint}': free some space, then run again with resume on to write the LoRA.",
                checkpoint=final_checkpoint,
            ) from exc
        return lora_path, extra_files, final_checkpoint

    lora_path, extra_files, final_checkpoint = distributed.on_main(save_outputs)
    if main and validation and validation.embeddings:
        callbacks.on_sample(session.step_count, session.sample(validation))
    log.info("trained %d steps in %.1f s; LoRA: %s", session.step_count - resumed_from, elapsed, lora_path)
    return TrainResult(lora_path, losses, session.step_count, resumed_from, final_checkpoint, extra_files)


def _adapter_file_name(stem: str, fmt: str) -> str:
    return f"{stem}{'' if fmt == 'default' else '_' + fmt}.safetensors"


def _stop_message(exc: TrainingStopped, path: Path | None, finite: bool) -> str:
    if not finite:
        kept = (f"the last finite checkpoint is '{path}'" if path else
                "no checkpoint with finite weights exists, so start again")
        return (f"{exc}; non-finite weights are never saved — {kept}. Lower the learning rate or check the dataset, "
                f"then {'resume' if path else 'train'}.")
    advice = ("Lower the learning rate or check the dataset, then resume." if "loss became" in str(exc)
              else "Run again with resume on to continue.")
    return f"{exc} — resumable checkpoint kept at '{path}'. {advice}"


def _save_adapters(session: TrainingSession, output_dir: Path, name: str, meta: dict[str, str],
                   overwrite: bool) -> tuple[Path, list[Path]]:
    """The LoRA in the default format and each export format, then the same for the EMA weights."""
    def save_all(stem: str, file_meta: dict[str, str]) -> list[Path]:
        return [lora.save_lora(output_dir / _adapter_file_name(stem, fmt),
                               session.transformer, {**file_meta, "format": fmt}, overwrite=overwrite,
                               text_encoders=session.text.trained, fmt=fmt)
                for fmt in ("default", *session.lora_cfg.export_formats)]

    paths = save_all(name, meta)
    if session.ema is not None:
        session.ema.store(session.params)
        session.ema.copy_to(session.params)
        try:
            paths += save_all(f"{name}_ema", {**meta, "ema_decay": str(session.train_cfg.ema_decay)})
        finally:
            session.ema.restore(session.params)
    return paths[0], paths[1:]
