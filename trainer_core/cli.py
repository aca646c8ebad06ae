"""Command line: ``python -m trainer_core demo`` and ``python -m trainer_core train --config FILE.toml``."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import distributed
from .config import (OPTIMIZERS, DatasetConfig, LoraConfig, ModelPaths, RunConfig, SampleConfig, TrainConfig,
                     load_run_config)
from .errors import TrainerInputError, TrainingStopped
from .memory import time_estimate
from .models.family import FLUX1, ModelFamily

log = logging.getLogger("trainer_core")

SAMPLES_DIR = Path(__file__).parent / "data" / "samples"
# The demo's defaults: the LoRA row of samples.png turns into the training images (tests/test_demo.py)
DEMO_RESOLUTION = 128
DEMO_STEPS = 900
DEMO_LEARNING_RATE = 1e-3


class TqdmCallbacks:
    """A tqdm bar with the running loss (the trainer's Callbacks protocol); once the step time has settled it
    prints the run's time (and cost, given a price per GPU-hour) estimate."""

    ESTIMATE_AFTER = 10  # steps measured before the estimate is printed (the first ones include warm-up)

    def __init__(self, total: int, price_per_gpu_hour: float | None = None):
        self.bar = tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)
        self.price = price_per_gpu_hour
        self.step_seconds: list[float] = []
        self.checkpoint: Path | None = None  # the newest checkpoint written, for the Ctrl+C message

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
        self.checkpoint = path  # the library logs each checkpoint once, above the bar (logging_redirect_tqdm)

    def should_stop(self) -> bool:
        return False


class Interrupted(KeyboardInterrupt):
    """Ctrl+C during training, carrying the resumable checkpoint that was kept."""

    def __init__(self, checkpoint: Path | None):
        super().__init__()
        self.checkpoint = checkpoint


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
                 model_config: dict | None = None, family: ModelFamily = FLUX1, items: list | None = None) -> int:
    """Cache → free the text encoders → load the transformer → train → ``samples.png`` and ``loss.png``.

    ``load_transformer(base_precision)`` is called only once the text encoders are gone, so the two never share
    memory. Given the transformer's ``model_config``, the memory plan is made and checked against VRAM and host RAM
    first, and the base streams straight to the planned precision (``base_precision`` is None without a plan).
    On N processes, process 0 caches (the others read its cache: the cache folder must be one they all see),
    shows progress and writes every file; ``vae`` and ``text_encoder`` are needed on process 0 only, unless
    training needs the text encoders live (:func:`needs_live_text`). ``family`` (the transformer's) says whether the
    validation samples need the negative prompt encoded (real CFG). ``items``: the dataset already scanned (and its
    pairs checked) from ``run.dataset``; scanned here when None.
    """
    from .data.cache import build_cache, build_prompt_cache
    from .data.dataset import scan_dataset
    from .fileio import ensure_writable_dir
    from .metrics import plot_loss
    from .train import Callbacks, ValidationPrompts, reference_tokens, sample_validation, train_lora, \
        validation_controls

    run.validate()
    distributed.on_main(ensure_writable_dir, out, "output.folder")
    cache_dir = Path(run.output.cache_folder) if run.output.cache_folder else out / "cache"

    def cache_dataset():
        cache = build_cache(scan_dataset(run.dataset) if items is None else items, vae, text_encoder, cache_dir,
                            progress=TqdmProgress("caching"), empty_caption=run.train.caption_dropout > 0)
        log.info("cache: %d items (%d reused, %d encoded) in %s", len(cache), cache.reused, cache.encoded, cache_dir)
        prompts = run.sample.prompts or sorted(set(cache.captions))[:4]
        negative = [run.sample.negative_prompt] if family.uses_negative_prompt else []
        embeddings = build_prompt_cache(prompts + negative, text_encoder, cache_dir)
        return cache, prompts, embeddings[:len(prompts)], (embeddings[len(prompts):] or [None])[0]

    cache, prompts, prompt_embeddings, negative_embedding = distributed.on_main(cache_dataset)
    validation = ValidationPrompts(prompt_embeddings, run.sample, negative=negative_embedding,
                                   controls=validation_controls(cache, prompts))
    # Everything is cached now: the encoders can go before the transformer arrives, unless training needs them
    # live (a text-encoder LoRA, or captions whose tags are shuffled each step).
    if not needs_live_text(run):
        text_encoder = None
    if vae is not None:
        vae.vae.to("cpu")
    mem_cfg = run.memory
    if model_config is None:
        transformer = load_transformer(None)
    else:
        from . import memory
        from .models.family import detect_family

        live_text = text_encoder is not None
        workload = memory.Workload.for_training(model_config, cache.sizes,
                                                cache.text(0)[0].shape[0] + reference_tokens(cache), run.lora,
                                                run.train)
        mem_cfg, vram = memory.plan_memory(run.memory, workload, device=device)
        # FLUX.1's CLIP-L + T5 (clip_model, t5_model) or FLUX.2's one language model (model)
        models = [getattr(text_encoder, name, None) for name in ("clip_model", "t5_model", "model")]
        live_bytes = sum(p.numel() * p.element_size() for m in models if m is not None
                         for p in m.parameters()) if live_text else 0
        host = memory.estimate_host_ram(vram, model_config, mem_cfg, compute_dtype=run.train.compute_dtype,
                                        text_encoder_bytes=live_bytes, text_encoders_live=live_text)
        log.info("memory plan (%s, %s): %s\n%s", mem_cfg.preset, detect_family(model_config).name, vram.summary(),
                 host.summary())
        memory.check_host_ram(host, mem_cfg)
        transformer = load_transformer(None if mem_cfg.base_precision == "auto" else mem_cfg.base_precision)

    main = distributed.is_main()
    callbacks = TqdmCallbacks(run.train.steps, price_per_gpu_hour) if main else Callbacks()
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
    except KeyboardInterrupt as exc:
        raise Interrupted(callbacks.checkpoint) from exc
    finally:
        if main:
            callbacks.bar.close()
    if not main:
        return 0

    print(f"LoRA:    {result.lora_path}")
    try:  # the comparison samples are extra work after the LoRA is written: a Ctrl+C here loses nothing
        dtype = torch.bfloat16 if run.train.compute_dtype == "bf16" else torch.float32
        transformer.disable_adapters()  # the same prompts and noise through the base model, for comparison
        before = sample_validation(transformer, validation, device, dtype)
        transformer.enable_adapters()
        after = sample_validation(transformer, validation, device, dtype)
        rows = [vae.decode(before), vae.decode(after)]
        # where a prompt is a training caption, show that training image (as the VAE sees it) above the samples
        by_caption = {c: i for i, c in enumerate(cache.captions)
                      if cache.sizes[i] == (run.sample.width, run.sample.height)}
        if all(p in by_caption for p in prompts):
            rows.insert(0, vae.decode(torch.stack([cache.latent(by_caption[p]) for p in prompts]).float()))
        grid = save_image_grid(rows, out / "samples.png")
        loss_png = plot_loss(result.losses, out / "loss.png")
        tail = result.losses[-10:]
        legend = ("rows: training image, base model, with the LoRA" if len(rows) == 3
                  else "rows: base model, with the LoRA")
        print(f"samples: {grid}  ({legend}; same prompts and noise)")
        print(f"loss:    {loss_png}  first {result.losses[0]:.4f}, "
              f"last (mean of last {len(tail)}) {sum(tail) / len(tail):.4f}")
    except KeyboardInterrupt:
        print("interrupted while drawing the comparison samples; the LoRA above is complete.", file=sys.stderr)
        return 130
    for extra in result.extra_files:
        print(f"also:    {extra}")
    if metrics_path:
        print(f"metrics: {metrics_path}")
    return 0


def parse_device(text: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N or mps, refused at once when it does not exist on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise TrainerInputError(f"--device: '{text}' is not a device name; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TrainerInputError(f"--device: '{text}' asked for, but this machine (or this torch build) has no "
                                    f"CUDA GPU; use --device cpu.")
        if device.index is not None and device.index >= count:
            raise TrainerInputError(f"--device: '{text}' does not exist; this machine has {count} CUDA GPU(s), "
                                    f"cuda:0 to cuda:{count - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainerInputError("--device: 'mps' is not available on this machine; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise TrainerInputError(f"--device: '{text}' is not supported; use cpu, cuda, cuda:N or mps.")
    return device


def needs_live_text(run: RunConfig) -> bool:
    """Training runs the text encoders (a text-encoder LoRA, or tags shuffled each step), not only the cache."""
    return run.lora.text_encoders != "none" or run.train.shuffle_tags


def demo_run_config(resolution: int, steps: int, learning_rate: float, seed: int) -> RunConfig:
    """The demo's recipe on the bundled images; ``tiny-models`` writes the same one into its config file."""
    run = RunConfig(
        dataset=DatasetConfig(folder=str(SAMPLES_DIR), resolutions=[resolution], repeats=1),
        lora=LoraConfig(rank=16, alpha=16.0),
        # Two images a step and a cosine decay: with one image at a constant rate the last steps' noise decided how
        # close each sample came (1.9× to 6× across seeds); this recipe stays ≥ 2.5× on every seed tried.
        train=TrainConfig(steps=steps, learning_rate=learning_rate, batch_size=2, scheduler="cosine",
                          compute_dtype="fp32", checkpoint_every=100, timestep_sampling="shift", seed=seed),
        sample=SampleConfig(steps=20, guidance=1.0, width=resolution, height=resolution),
    )
    run.output.name = "demo_lora"
    return run


def cmd_demo(args) -> int:
    from .models.tiny import build_tiny_flow_transformer, build_tiny_text_encoder, build_tiny_vae

    device = args.device
    out = Path(args.out)
    # The tiny model's matrices are too small to split across threads: more threads only add synchronisation (on a
    # busy 2-core machine a step took 25× longer with two threads than with one).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run = demo_run_config(args.resolution, args.steps, args.lr, args.seed)
    run.output.overwrite = True
    print(f"demo: tiny FLUX-architecture model, {len(list(SAMPLES_DIR.glob('*.png')))} bundled images, "
          f"{args.steps} steps on {args.device} → {out}")
    return run_training(lambda _precision: build_tiny_flow_transformer(seed=args.seed), build_tiny_vae(seed=args.seed),
                        build_tiny_text_encoder(seed=args.seed), run, out, device,
                        "tiny-flux (demo)", metrics_path=out / "metrics.jsonl")


def config_toml(run: RunConfig) -> str:
    """The settings of ``run`` that differ from the defaults, as a TOML file ``train --config`` reads."""
    default = RunConfig()
    lines = []
    for section in dataclasses.fields(run):
        values = dataclasses.asdict(getattr(run, section.name))
        defaults = dataclasses.asdict(getattr(default, section.name))
        changed = {k: v for k, v in values.items() if v != defaults[k]}
        if changed:
            # JSON's strings, numbers, booleans and lists of them are valid TOML values
            lines += [f"[{section.name}]", *(f"{k} = {json.dumps(v)}" for k, v in changed.items()), ""]
    return "\n".join(lines)


def cmd_tiny_models(args) -> int:
    from .fileio import atomic_dir

    folder = Path(args.folder).expanduser().resolve()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # an empty folder is taken over
    elif folder.exists():
        raise TrainerInputError(f"tiny-models: '{folder}' already exists; give a new folder (or delete this one).")
    run = demo_run_config(DEMO_RESOLUTION, DEMO_STEPS, DEMO_LEARNING_RATE, seed=0)
    run.output.folder, run.output.name = (folder / "output").as_posix(), "tiny_lora"
    if args.family == "flux2":
        from .models.flux2_encoders import TINY_FLUX2_FILES, TINY_MAX_LENGTH, write_tiny_flux2_models

        write, header = write_tiny_flux2_models, (
            "# Tiny FLUX.2 klein-shaped models (python -m trainer_core tiny-models --family flux2) and the demo's\n"
            "# recipe, sampled as klein base is (real CFG against the negative prompt): the headless FLUX.2 path\n"
            "# end to end on a CPU.\n\n")
        run.model = ModelPaths(**{key: (folder / name).as_posix() for key, name in TINY_FLUX2_FILES.items()},
                               text_max_length=TINY_MAX_LENGTH)
        run.train.timestep_sampling = "flux_shift"  # FLUX.2's own resolution shift
        run.sample.guidance = 4.0  # Flux2KleinPipeline's default CFG scale
    else:
        from .models.tiny import TINY_MODEL_FILES, TINY_T5_MAX_LENGTH, write_tiny_models

        write, header = write_tiny_models, (
            "# Tiny FLUX.1-architecture models (python -m trainer_core tiny-models) and the demo's recipe: the\n"
            f"# headless path end to end on a CPU. The diffusers-format transformer folder works too:\n"
            f"# transformer = \"{(folder / TINY_MODEL_FILES['transformer_diffusers']).as_posix()}\"\n\n")
        run.model = ModelPaths(**{key: (folder / TINY_MODEL_FILES[key]).as_posix()
                                  for key in ("transformer", "vae", "clip_l", "t5", "tokenizers")},
                               t5_max_length=TINY_T5_MAX_LENGTH)
    config = folder / "train.toml"
    with atomic_dir(folder) as staging:
        write(staging)
        (staging / config.name).write_text(header + config_toml(run), encoding="utf-8")
    print(f"tiny models and a ready config written to {folder}\n"
          f"train:   python -m trainer_core train --config {config}")
    return 0


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
    from .models.family import check_transformer

    run = load_run_config(Path(args.config)) if args.config else RunConfig()
    for flag, (section, name, _) in _OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(getattr(run, section), name, value)
    if args.resume:
        run.output.resume = True
    run.validate()
    device = args.device
    paths = run.model
    if not paths.transformer:
        raise TrainerInputError("[model] transformer: no file given; set it in the config file.")
    if not Path(paths.transformer).exists():
        raise TrainerInputError(f"[model] transformer: '{paths.transformer}' does not exist; check the path in the "
                                "config.")
    # The transformer is loaded only after caching (minutes with a real text encoder): read its family from the
    # file now, so encoders of the other family are refused before anything loads.
    family = check_transformer(paths.transformer)
    named = {"flux1": "FLUX.1", "flux2": "FLUX.2"}.get(paths.family)
    if named and named != family.name:
        raise TrainerInputError(f"[model] family: '{paths.family}' ({named}), but transformer '{paths.transformer}' "
                                f"is a {family.name} transformer; set family = \"auto\" or choose a {named} "
                                "transformer.")
    family.check_model_paths(paths, paths.transformer)
    family.check_lora_config(run.lora)
    if not run.dataset.folder:
        raise TrainerInputError("[dataset] folder: no dataset folder given; set it in the config or use --dataset.")
    # The dataset (with its pairs) is read before any encoder loads (minutes with real files), so a bad image or a
    # target without its control is reported at once.
    from .data.dataset import scan_dataset

    items = distributed.on_main(scan_dataset, run.dataset)
    out = Path(run.output.folder)
    dtype = torch.bfloat16 if run.train.compute_dtype == "bf16" else torch.float32
    base_name = paths.base_name or Path(paths.transformer).name
    main = distributed.is_main()  # on N processes only process 0 encodes (and decodes the samples)
    return run_training(
        lambda precision: family.load_transformer(paths.transformer, dtype=dtype, base_precision=precision),
        family.load_vae(paths.vae, device=device) if main else None,
        family.load_text_encoder(paths, device=device) if main or needs_live_text(run) else None,
        run, out, device, base_name, price_per_gpu_hour=args.gpu_price,
        model_config=family.file_config(paths.transformer), family=family, items=items,
    )


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        prog="python -m trainer_core",
        description="Train FLUX.1 LoRAs without ComfyUI (the same library the ComfyUI nodes use).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a LoRA on a tiny built-in model and bundled images (CPU, under a minute)")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default: {DEMO_STEPS})")
    demo.add_argument("--lr", type=float, default=DEMO_LEARNING_RATE,
                      help=f"learning rate (default: {DEMO_LEARNING_RATE:g})")
    demo.add_argument("--resolution", type=int, default=DEMO_RESOLUTION,
                      help=f"training resolution in px (default: {DEMO_RESOLUTION})")
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

    tiny = sub.add_parser(
        "tiny-models", help="write tiny FLUX.1-architecture model files and a ready config, to try train --config "
                            "without the FLUX.1 downloads (CPU, about a minute)")
    tiny.add_argument("folder", help="a new folder for the model files and train.toml")
    tiny.add_argument("--family", choices=("flux1", "flux2"), default="flux1",
                      help="flux1 (default) or flux2: tiny FLUX.2 klein-shaped transformer, FLUX.2 VAE and Qwen3")
    tiny.set_defaults(func=cmd_tiny_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    args = build_parser().parse_args(argv)
    # Under torchrun / accelerate launch (WORLD_SIZE > 1) this process is one of several; otherwise nothing changes.
    prefix = f"[rank {os.environ.get('RANK', '?')}] " if distributed.launched() else ""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=prefix + "%(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "device"):  # commands that train; a bad name fails in one line before anything starts
            args.device = distributed.setup(parse_device(args.device))
        if not distributed.is_main():  # the others only warn: one log, one progress bar
            logging.getLogger().setLevel(logging.WARNING)
        with logging_redirect_tqdm():  # log lines print above the progress bars instead of through them
            return args.func(args)
    except TrainerInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as exc:
        checkpoint = getattr(exc, "checkpoint", None)
        if checkpoint:
            print(f"interrupted: resumable checkpoint kept at '{checkpoint}'; run again with --resume to continue.",
                  file=sys.stderr)
        else:  # Ctrl+C while caching or loading: the cache keeps every item it finished
            print("interrupted before training began: there is no checkpoint to resume; run again (items already "
                  "cached are reused).", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({exc.filename or exc}); free some space and run again.", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
