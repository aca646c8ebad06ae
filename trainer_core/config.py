"""Typed settings shared by the CLI, the ComfyUI nodes and checkpoints.

This is the one place that knows defaults, allowed values and the messages for bad values. Every
dataclass has ``validate()``, which raises :class:`TrainerInputError` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TrainerInputError
from .fileio import safe_output_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_FALLBACKS = ("stem", "trigger")
CROP_MODES = ("center", "random")
TIMESTEP_SAMPLERS = ("uniform", "sigmoid", "shift", "flux_shift")
OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "paged_adamw8bit", "adafactor", "prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "polynomial", "linear")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
ALGORITHMS = ("lora", "lokr", "loha", "oft")
TEXT_ENCODER_TARGETS = ("none", "clip_l", "t5", "both")
EXPORT_FORMATS = ("kohya", "comfy")
COMPUTE_DTYPES = ("bf16", "fp32")
BASE_PRECISIONS = ("auto", "bf16", "fp32", "fp8", "nf4", "int8")  # auto = stored in the compute dtype
LORA_DTYPES = ("fp32", "bf16")


def _check_choice(section: str, name: str, value: str, choices) -> None:
    if value not in choices:
        raise TrainerInputError(f"{section}.{name}: '{value}' is not one of {', '.join(choices)}.")


def _check_finite(section: str, instance) -> None:
    """Refuse NaN and ±inf in every float (or list of floats) field: no range check would catch a NaN."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise TrainerInputError(f"{section}.{f.name}: must be a finite number, got {item}.")


def _check_positive(section: str, name: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise TrainerInputError(f"{section}.{name}: must be {bound}, got {value}.")


@dataclass
class DatasetConfig:
    folder: str = ""
    trigger_word: str = ""
    caption_extension: str = ".txt"
    caption_fallback: str = "stem"  # used when an image has no caption file: its file stem, or the trigger word only
    resolutions: list[int] = field(default_factory=lambda: [512])
    buckets: bool = True  # aspect-ratio buckets (area-preserving); False = square center/random crops
    crop: str = "center"
    flip: bool = False  # also train on the mirrored image (cached once each)
    repeats: int = 1
    allow_upscale: bool = False  # refuse images that would need enlarging for the smallest resolution
    seed: int = 0
    masked_loss: bool = False  # weight the loss by a grey-scale mask <stem><mask_suffix>.png next to each image
    mask_suffix: str = "_mask"

    def validate(self) -> "DatasetConfig":
        _check_finite("dataset", self)
        _check_choice("dataset", "caption_fallback", self.caption_fallback, CAPTION_FALLBACKS)
        if self.masked_loss and not self.mask_suffix.strip():
            raise TrainerInputError("dataset.mask_suffix: masked_loss needs a suffix naming the masks, e.g. '_mask'.")
        _check_choice("dataset", "crop", self.crop, CROP_MODES)
        _check_positive("dataset", "repeats", self.repeats)
        if not self.resolutions:
            raise TrainerInputError("dataset.resolutions: give at least one resolution, e.g. [512].")
        for res in self.resolutions:
            if res <= 0 or res % 16:
                raise TrainerInputError(
                    f"dataset.resolutions: {res} is not a positive multiple of 16 "
                    f"(FLUX packs 2×2 latent patches of an 8× VAE). Try {max(16, round(res / 16) * 16)}."
                )
        return self


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    targets: str = "attention+ffs"  # a preset name from lora.TARGET_PRESETS, or a regex over module names
    dropout: float = 0.0
    algorithm: str = "lora"  # lora, lokr, loha or oft (peft); for oft, rank is the block size
    use_dora: bool = False  # DoRA (weight-decomposed LoRA); algorithm lora only
    rank_pattern: str = ""  # per-module ranks: "regex=rank, …" over module names, e.g. "proj_mlp=8"
    alpha_pattern: str = ""  # per-module alphas, same form
    lokr_factor: int = -1  # LoKr Kronecker factor; -1 = as square as possible
    init_from: str = ""  # warm start: a LoRA file (this trainer's, kohya or ComfyUI format) with the same targets
    export_formats: list[str] = field(default_factory=list)  # extra files besides the default: "kohya", "comfy"
    text_encoders: str = "none"  # also train a LoRA on: none, clip_l, t5 or both
    text_encoder_rank: int = 8
    text_encoder_alpha: float = 8.0

    def validate(self) -> "LoraConfig":
        _check_finite("lora", self)
        if self.rank <= 0:
            raise TrainerInputError(f"lora.rank: must be a positive integer (typical 4–64), got {self.rank}.")
        if self.alpha <= 0:
            raise TrainerInputError(f"lora.alpha: must be > 0 (commonly equal to rank), got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise TrainerInputError(f"lora.dropout: must be in [0, 1), got {self.dropout}.")
        _check_choice("lora", "algorithm", self.algorithm, ALGORITHMS)
        _check_choice("lora", "text_encoders", self.text_encoders, TEXT_ENCODER_TARGETS)
        if self.use_dora and self.algorithm != "lora":
            raise TrainerInputError(f"lora.use_dora: DoRA applies to algorithm 'lora' only, not "
                                    f"'{self.algorithm}'. Turn use_dora off or set algorithm = 'lora'.")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise TrainerInputError(f"lora.lokr_factor: must be -1 (automatic) or ≥ 1, got {self.lokr_factor}.")
        _check_positive("lora", "text_encoder_rank", self.text_encoder_rank)
        _check_positive("lora", "text_encoder_alpha", self.text_encoder_alpha)
        for fmt in self.export_formats:
            _check_choice("lora", "export_formats", fmt, EXPORT_FORMATS)
        return self


@dataclass
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 1e-4
    batch_size: int = 1
    gradient_accumulation: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=list)  # empty = the optimizer's own defaults
    eps: float = 0.0  # 0 = the optimizer's own default
    optimizer_args: str = ""  # extra optimizer settings, "name=value, …" (e.g. "d_coef=2" for Prodigy)
    text_encoder_lr: float = 0.0  # learning rate of text-encoder LoRAs; 0 = learning_rate
    scheduler: str = "constant"
    warmup_steps: int = 0
    scheduler_cycles: int = 1  # cosine_with_restarts: number of hard restarts
    scheduler_power: float = 1.0  # polynomial: decay power
    loss_type: str = "l2"
    huber_c: float = 0.1  # huber / smooth_l1: where the loss turns from quadratic to linear
    caption_dropout: float = 0.0  # chance a sample trains with an empty caption
    shuffle_tags: bool = False  # shuffle comma-separated caption tags every time a caption is used
    keep_tags: int = 1  # leading tags that keep their place when shuffling (the trigger word comes first)
    ema_decay: float = 0.0  # EMA of the LoRA weights (saved as <name>_ema); 0 = off, typical 0.999
    max_grad_norm: float = 1.0  # 0 disables clipping
    compute_dtype: str = "bf16"
    timestep_sampling: str = "flux_shift"
    sigmoid_mean: float = 0.0
    sigmoid_std: float = 1.0
    sigmoid_scale: float = 1.0
    shift: float = 3.0
    guidance: float = 1.0
    seed: int = 42
    checkpoint_every: int = 250  # 0 = only on interrupt/error and at the end
    keep_checkpoints: int = 2

    def validate(self) -> "TrainConfig":
        _check_finite("train", self)
        _check_positive("train", "steps", self.steps)
        _check_positive("train", "learning_rate", self.learning_rate)
        _check_positive("train", "batch_size", self.batch_size)
        _check_positive("train", "gradient_accumulation", self.gradient_accumulation)
        _check_positive("train", "weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("train", "warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("train", "max_grad_norm", self.max_grad_norm, allow_zero=True)
        _check_positive("train", "checkpoint_every", self.checkpoint_every, allow_zero=True)
        _check_positive("train", "keep_checkpoints", self.keep_checkpoints)
        _check_positive("train", "sigmoid_std", self.sigmoid_std)
        _check_positive("train", "sigmoid_scale", self.sigmoid_scale)
        _check_positive("train", "shift", self.shift)
        _check_positive("train", "guidance", self.guidance, allow_zero=True)
        _check_choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train", "scheduler", self.scheduler, SCHEDULERS)
        _check_choice("train", "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("train", "timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLERS)
        _check_choice("train", "loss_type", self.loss_type, LOSS_TYPES)
        _check_positive("train", "eps", self.eps, allow_zero=True)
        _check_positive("train", "text_encoder_lr", self.text_encoder_lr, allow_zero=True)
        _check_positive("train", "scheduler_cycles", self.scheduler_cycles)
        _check_positive("train", "scheduler_power", self.scheduler_power)
        _check_positive("train", "huber_c", self.huber_c)
        _check_positive("train", "keep_tags", self.keep_tags, allow_zero=True)
        for name in ("caption_dropout", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainerInputError(f"train.{name}: must be in [0, 1), got {getattr(self, name)}.")
        if self.betas and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            raise TrainerInputError(f"train.betas: give two values in [0, 1), e.g. [0.9, 0.999], or none for the "
                                    f"optimizer's defaults; got {self.betas}.")
        if self.betas and self.optimizer == "adafactor":
            raise TrainerInputError("train.betas: Adafactor has no betas. Leave betas empty and set "
                                    "optimizer_args = 'beta1=0.9' (and decay_rate) instead.")
        if self.eps and self.optimizer in ("adafactor", "lion8bit"):
            hint = " (Adafactor's eps pair goes in optimizer_args)." if self.optimizer == "adafactor" else "."
            raise TrainerInputError(f"train.eps: {self.optimizer} takes no single eps. Set eps = 0{hint}")
        return self


@dataclass
class MemoryConfig:
    """How the frozen base is stored and streamed. Presets in ``memory.presets`` fill these.

    ``preset`` "none" uses the fields as written; "auto" or a tier ("8gb" … "80gb") fills them from the tier
    table (``memory.presets``), and fields the user set explicitly override the tier.
    """

    PRESETS = ("none", "auto", "8gb", "12gb", "16gb", "24gb", "48gb", "80gb")

    preset: str = "none"
    base_precision: str = "auto"
    lora_dtype: str = "fp32"
    blocks_to_swap: int = 0  # transformer blocks (of 57 in FLUX.1) kept in host RAM and streamed in
    prefetch_blocks: int = 1  # swapped blocks loaded ahead of use (each costs one block of VRAM)
    gradient_checkpointing: bool = False
    uncheckpointed_blocks: int = 0  # with checkpointing: the last N resident blocks keep activations (faster)
    offload_activations: bool = False  # checkpointed block inputs wait in host RAM for the backward pass
    compile_blocks: bool = False
    batch_size: int = 0  # 0 = use train.batch_size; a preset sets its tier's batch size
    optimizer: str = ""  # "" = use train.optimizer; a preset sets its tier's optimizer
    vram_budget_gb: float = 0.0  # 0 = the free VRAM detected; else the most VRAM training may use (GiB)

    def validate(self) -> "MemoryConfig":
        _check_finite("memory", self)
        _check_choice("memory", "preset", self.preset, self.PRESETS)
        _check_choice("memory", "base_precision", self.base_precision, BASE_PRECISIONS)
        _check_choice("memory", "lora_dtype", self.lora_dtype, LORA_DTYPES)
        _check_positive("memory", "blocks_to_swap", self.blocks_to_swap, allow_zero=True)
        _check_positive("memory", "prefetch_blocks", self.prefetch_blocks)
        _check_positive("memory", "uncheckpointed_blocks", self.uncheckpointed_blocks, allow_zero=True)
        _check_positive("memory", "batch_size", self.batch_size, allow_zero=True)
        _check_positive("memory", "vram_budget_gb", self.vram_budget_gb, allow_zero=True)
        if self.optimizer:
            _check_choice("memory", "optimizer", self.optimizer, OPTIMIZERS)
        for name in ("blocks_to_swap", "offload_activations"):
            if getattr(self, name) and not self.gradient_checkpointing:
                raise TrainerInputError(
                    f"memory.{name}: needs gradient_checkpointing = true (without it every block's weights and "
                    f"activations stay referenced until the backward pass, so nothing is saved). Turn "
                    f"gradient_checkpointing on, or set {name} to {0 if name == 'blocks_to_swap' else 'false'}."
                )
        return self


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)
    every: int = 0  # steps between validation samples; 0 = only at the end
    steps: int = 20
    guidance: float = 3.5  # embedded guidance (FLUX.1 dev, FLUX.2 dev); the CFG scale for FLUX.2 klein base
    negative_prompt: str = ""  # FLUX.2 klein base: classifier-free guidance against this prompt
    seed: int = 0
    width: int = 512
    height: int = 512

    def validate(self) -> "SampleConfig":
        _check_finite("sample", self)
        _check_positive("sample", "steps", self.steps)
        _check_positive("sample", "every", self.every, allow_zero=True)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                raise TrainerInputError(f"sample.{name}: {value} is not a positive multiple of 16.")
        return self


@dataclass
class ModelPaths:
    """Model files for the CLI (inside ComfyUI the loaders provide these)."""

    FAMILIES = ("auto", "flux1", "flux2")

    transformer: str = ""
    family: str = "auto"  # read from the transformer's weights; flux1 / flux2 only confirm it
    vae: str = ""
    clip_l: str = ""  # FLUX.1
    t5: str = ""  # FLUX.1
    text_encoder: str = ""  # FLUX.2: Qwen3 (klein) file or folder, Mistral-Small-3 (dev) folder
    # FLUX.1: folder holding clip/ and t5/ tokenizer files; FLUX.2: the text encoder's tokenizer folder;
    # empty = next to the encoders
    tokenizers: str = ""
    t5_max_length: int = 512  # 512 for FLUX.1-dev, 256 for schnell
    text_max_length: int = 512  # FLUX.2's text tokens (its pipelines and ComfyUI use 512)
    base_name: str = ""  # recorded in LoRA metadata; defaults to the transformer file name

    def validate(self) -> "ModelPaths":
        _check_choice("model", "family", self.family, self.FAMILIES)
        _check_positive("model", "t5_max_length", self.t5_max_length)
        _check_positive("model", "text_max_length", self.text_max_length)
        return self


@dataclass
class OutputConfig:
    folder: str = "output"
    name: str = "flux_lora"
    overwrite: bool = False
    resume: bool = False
    cache_folder: str = ""  # empty = <folder>/cache

    def validate(self) -> "OutputConfig":
        if not self.folder.strip():
            raise TrainerInputError("output.folder: no folder given; set it to where the LoRA should be written.")
        safe_output_name(self.name, "output.name")
        return self


@dataclass
class RunConfig:
    model: ModelPaths = field(default_factory=ModelPaths)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "RunConfig":
        for section in (self.model, self.dataset, self.lora, self.train, self.memory, self.sample, self.output):
            section.validate()
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
        """Build from nested dicts (a parsed TOML file); unknown sections or keys are errors, not ignored."""
        run = cls()
        for section_name, values in data.items():
            if section_name not in {f.name for f in dataclasses.fields(cls)}:
                known = ", ".join(f.name for f in dataclasses.fields(cls))
                raise TrainerInputError(f"{source}: unknown section [{section_name}]; known sections: {known}.")
            if not isinstance(values, dict):
                raise TrainerInputError(f"{source}: [{section_name}] must be a table of settings.")
            setattr(run, section_name, _replace_checked(getattr(run, section_name), values, f"{source} [{section_name}]"))
        return run


def _replace_checked(instance, values: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(instance)}
    types = typing.get_type_hints(type(instance))
    converted = {}
    for key, value in values.items():
        if key not in known:
            raise TrainerInputError(f"{where}: unknown setting '{key}'; known: {', '.join(known)}.")
        kind = types[key]
        if typing.get_origin(kind) is list:
            (item_kind,) = typing.get_args(kind)
            items = value if isinstance(value, list) else [value]
            converted[key] = [_checked_value(item, item_kind, f"{where}: '{key}' entries") for item in items]
        else:
            converted[key] = _checked_value(value, kind, f"{where}: '{key}'")
    return dataclasses.replace(instance, **converted)


def _checked_value(value, kind: type, what: str):
    """``value`` as ``kind`` (bool, int, float or str), or an error saying what was expected."""
    if kind is bool:
        if not isinstance(value, bool):
            raise TrainerInputError(f"{what} must be true or false, got {value!r}.")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainerInputError(f"{what} must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise TrainerInputError(f"{what} must be a finite number, got {value!r}.")
        if kind is int and not float(value).is_integer():
            raise TrainerInputError(f"{what} must be a whole number, got {value!r}.")
        return kind(value)
    if not isinstance(value, str):
        raise TrainerInputError(f"{what} must be text (in quotes), got {value!r}.")
    return value


def load_run_config(path: Path) -> RunConfig:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise TrainerInputError(f"--config: file '{path}' does not exist.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TrainerInputError(f"--config: '{path}' is not valid TOML: {exc}") from exc
    return RunConfig.from_dict(data, source=str(path))
