"""Command line: ``python -m trainer_core demo`` and ``python -m trainer_core train --config FILE.toml``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .config import OPTIMIZERS, DatasetConfig, LoraConfig, RunConfig, SampleConfig, TrainConfig, load_run_config
from .errors import TrainerInputError, TrainingStopped
from .memory import time_estimate

log = logging.getLogger("trainer_core")

SAMPLES_DIR = Path(__file__).parent / "data" / "samples"


class TqdmCallbacks:
    """A tqdm bar with the running loss (the trainer's Callbacks protocol); once the step time has settled it
    prints the run's time (and cost, given a price per GPU-hour) estimate."""

    ESTIMATE_AFTER = 10  # steps measured before the estimate is printed (the first ones include warm-up)

    def __init__(self, total: int, price_per_gpu_hour: float | None = None):
        self.bar = tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)
        self.price = price_per_gpu_hour
        self.step_seconds: list[float] = []

    def on_step(self, info) -> None:
        self.bar.n = info.step
        self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
        self.bar.refresh()
        self.step_seconds.append(info.seconds_per_step)
        if len(self.step_seconds) == self.ESTIMATE_AFTER:
            estimate = time_estimate(self.step_seconds, info.total_steps, info.step, self.price)
            self.bar.write(f"estimate: {estimate.summary()}")

    def on_sample(self, step, latents) -> None:
        pass

    def on_checkpoint(self, path) -> None:
        self.bar.write(f"checkpoint: {path}")

    def should_stop(self) -> bool:
        return False


class TqdmProgress:
    """``progress(done, total)`` callback for caching."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="item", dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.bar.close()


def save_image_grid(rows: list[torch.Tensor], path: Path) -> Path:
    """Rows of images [N, 3, H, W] in 0..1 → one PNG, one grid line per row."""
    from PIL import Image

    from .fileio import atomic_path

    lines = [torch.cat(list(row.float().clamp(0, 1)), dim=2) for row in rows]
    width = max(line.shape[2] for line in lines)
    lines = [torch.nn.functional.pad(line, (0, width - line.shape[2])) for line in lines]
    pixels = (torch.cat(lines, dim=1).permute(1, 2, 0) * 255).round().byte().numpy()
    with atomic_path(Path(path)) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return Path(path)


def run_training(load_transformer, vae, text_encoder, run: RunConfig, out: Path, device, base_name: str,
                 metrics_path: Path | None = None, price_per_gpu_hour: float | None = None,
                 model_config: dict | None = None) -> int:
    """Cache → free the text encoders → load the transformer → train → ``samples.png`` and ``loss.png``.

    ``load_transformer`` is called only once the text encoders are gone, so the two never share memory. Given
    the transformer's ``model_config``, the memory plan is made and checked against VRAM and host RAM first,
    and ``load_transformer(base_precision)`` streams the base straight to the planned precision.
    """
    from .data.cache import build_cache, build_prompt_cache
    from .data.dataset import scan_dataset
    from .metrics import plot_loss
    from .train import ValidationPrompts, sample_validation, train_lora

    run.validate()
    items = scan_dataset(run.dataset)
    cache_dir = Path(run.output.cache_folder) if run.output.cache_folder else out / "cache"
    cache = build_cache(items, vae, text_encoder, cache_dir, progress=TqdmProgress("caching"),
                        empty_caption=run.train.caption_dropout > 0)
    log.info("cache: %d items (%d reused, %d encoded) in %s", len(cache), cache.reused, cache.encoded, cache_dir)
    prompts = run.sample.prompts or sorted(set(cache.captions))[:4]
    validation = ValidationPrompts(build_prompt_cache(prompts, text_encoder, cache_dir), run.sample)
    # Everything is cached now: the encoders can go before the transformer arrives, unless training needs them
    # live (a text-encoder LoRA, or captions whose tags are shuffled each step).
    live_text = run.lora.text_encoders != "none" or run.train.shuffle_tags
    if not live_text:
        text_encoder = None
    vae.vae.to("cpu")
    mem_cfg = run.memory
    if model_config is None:
        transformer = load_transformer()
    else:
        from . import memory

        workload = memory.Workload.for_training(model_config, cache.sizes, cache.text(0)[0].shape[0], run.lora,
                                                run.train)
        mem_cfg, vram = memory.plan_memory(run.memory, workload, device=device)
        live_bytes = sum(p.numel() * p.element_size() for m in (text_encoder.clip_model, text_encoder.t5_model)
                         for p in m.parameters()) if live_text else 0
        memory.check_host_ram(memory.estimate_host_ram(vram, model_config, mem_cfg,
                                                       compute_dtype=run.train.compute_dtype,
                                                       text_encoder_bytes=live_bytes, text_encoders_live=live_text),
                              mem_cfg)
        transformer = load_transformer(None if mem_cfg.base_precision == "auto" else mem_cfg.base_precision)

    callbacks = TqdmCallbacks(run.train.steps, price_per_gpu_hour)
    try:
        result = train_lora(
            transformer, cache, lora_cfg=run.lora, train_cfg=run.train, mem_cfg=mem_cfg,
            output_dir=out, output_name=run.output.name, resume=run.output.resume,
            overwrite=run.output.overwrite, metrics_path=metrics_path, validation=validation,
            callbacks=callbacks, device=device, text_encoder=text_encoder,
            metadata={
                "base_model": base_name,
                "resolutions": ",".join(map(str, run.dataset.resolutions)),
                "trigger_word": run.dataset.trigger_word,
            },
        )
    finally:
        callbacks.bar.close()

    dtype = torch.bfloat16 if run.train.compute_dtype == "bf16" else torch.float32
    transformer.disable_adapters()  # the same prompts and noise through the base model, for comparison
    before = sample_validation(transformer, validation, device, dtype)
    transformer.enable_adapters()
    after = sample_validation(transformer, validation, device, dtype)
    rows = [vae.decode(before), vae.decode(after)]
    # where a prompt is a training caption, show that training image (as the VAE sees it) above the samples
    by_caption = {c: i for i, c in enumerate(cache.captions) if cache.sizes[i] == (run.sample.width, run.sample.height)}
    if all(p in by_caption for p in prompts):
        rows.insert(0, vae.decode(torch.stack([cache.latent(by_caption[p]) for p in prompts]).float()))
    grid = save_image_grid(rows, out / "samples.png")
    loss_png = plot_loss(result.losses, out / "loss.png")
    tail = result.losses[-10:]
    legend = "rows: training image, base model, with the LoRA" if len(rows) == 3 else "rows: base model, with the LoRA"
    print(f"LoRA:    {result.lora_path}")
    print(f"samples: {grid}  ({legend}; same prompts and noise)")
    print(f"loss:    {loss_png}  first {result.losses[0]:.4f}, last (mean of last {len(tail)}) {sum(tail) / len(tail):.4f}")
    for extra in result.extra_files:
        print(f"also:    {extra}")
    if metrics_path:
        print(f"metrics: {metrics_path}")
    return 0


def cmd_demo(args) -> int:
    from .models.tiny import build_tiny_text_encoder, build_tiny_transformer, build_tiny_vae

    out = Path(args.out)
    torch.manual_seed(0)
    run = RunConfig(
        dataset=DatasetConfig(folder=str(SAMPLES_DIR), resolutions=[args.resolution], repeats=1),
        lora=LoraConfig(rank=16, alpha=16.0),
        train=TrainConfig(steps=args.steps, learning_rate=args.lr, compute_dtype="fp32", checkpoint_every=100,
                          timestep_sampling="sigmoid", seed=args.seed),
        sample=SampleConfig(steps=20, guidance=1.0, width=args.resolution, height=args.resolution),
    )
    run.output.name = "demo_lora"
    run.output.overwrite = True
    print(f"demo: tiny FLUX-architecture model, {len(list(SAMPLES_DIR.glob('*.png')))} bundled images, "
          f"{args.steps} steps on {args.device} → {out}")
    return run_training(lambda: build_tiny_transformer(seed=args.seed), build_tiny_vae(seed=args.seed),
                        build_tiny_text_encoder(seed=args.seed), run, out, torch.device(args.device),
                        "tiny-flux (demo)", metrics_path=out / "metrics.jsonl")


_OVERRIDES = {
    # flag: (section, field, type)
    "steps": ("train", "steps", int),
    "lr": ("train", "learning_rate", float),
    "batch_size": ("train", "batch_size", int),
    "optimizer": ("train", "optimizer", str),
    "seed": ("train", "seed", int),
    "rank": ("lora", "rank", int),
    "alpha": ("lora", "alpha", float),
    "dataset": ("dataset", "folder", str),
    "trigger": ("dataset", "trigger_word", str),
    "out": ("output", "folder", str),
    "name": ("output", "name", str),
}


def cmd_train(args) -> int:
    from .models.encoders import load_text_encoders, load_vae
    from .models.flux import flux_file_config, load_flux_transformer

    run = load_run_config(Path(args.config)) if args.config else RunConfig()
    for flag, (section, name, _) in _OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(getattr(run, section), name, value)
    if args.resume:
        run.output.resume = True
    run.validate()
    paths = run.model
    for field_name in ("transformer", "vae", "clip_l", "t5"):
        value = getattr(paths, field_name)
        if not value:
            raise TrainerInputError(f"[model] {field_name}: no file given; set it in the config file.")
        if not Path(value).exists():
            raise TrainerInputError(f"[model] {field_name}: '{value}' does not exist; check the path in the config.")
    if not run.dataset.folder:
        raise TrainerInputError("[dataset] folder: no dataset folder given; set it in the config or use --dataset.")
    out = Path(run.output.folder)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if run.train.compute_dtype == "bf16" else torch.float32
    base_name = paths.base_name or Path(paths.transformer).name
    return run_training(
        lambda precision: load_flux_transformer(paths.transformer, dtype=dtype, base_precision=precision),
        load_vae(paths.vae, device=device),
        load_text_encoders(paths.clip_l, paths.t5, tokenizer_dir=paths.tokenizers or None,
                           t5_max_length=paths.t5_max_length, device=device),
        run, out, device, base_name, price_per_gpu_hour=args.gpu_price,
        model_config=flux_file_config(paths.transformer),
    )


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        prog="python -m trainer_core",
        description="Train FLUX.1 LoRAs without ComfyUI (the same library the ComfyUI nodes use).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a LoRA on a tiny built-in model and bundled images (CPU, ~1 min)")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    demo.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    demo.add_argument("--resolution", type=int, default=128, help="training resolution in px (default: 128)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser(
        "train", help="train on real FLUX.1 model files",
        description="Settings come from a TOML file with sections [model] [dataset] [lora] [train] [memory] "
                    "[sample] [output] (see README); flags override the file.",
    )
    train.add_argument("--config", help="TOML settings file")
    train.add_argument("--steps", type=int)
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--optimizer", choices=OPTIMIZERS)
    train.add_argument("--seed", type=int)
    train.add_argument("--rank", type=int)
    train.add_argument("--alpha", type=float)
    train.add_argument("--dataset", help="image folder")
    train.add_argument("--trigger", help="trigger word prepended to every caption")
    train.add_argument("--out", help="output folder")
    train.add_argument("--name", help="LoRA file name (without .safetensors)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of --name")
    train.add_argument("--device", default=default_device, help=f"cpu or cuda (default: {default_device})")
    train.add_argument("--gpu-price", dest="gpu_price", type=float,
                       help="price per GPU-hour: the run's cost is printed with its time estimate")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except TrainerInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: a resumable checkpoint was saved; run again with --resume to continue.", file=sys.stderr)
        return 130
