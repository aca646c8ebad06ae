"""FluxLoraTrain: train a LoRA on the given FLUX.1 or FLUX.2 MODEL → MODEL with it applied, LORA_MODEL, LOSS_MAP,
file name."""

from __future__ import annotations

import dataclasses
import logging
import traceback

import torch

from ..trainer_core.config import OPTIMIZERS, TIMESTEP_SAMPLERS, LoraConfig, MemoryConfig, SampleConfig, TrainConfig
from ..trainer_core.errors import TrainerInputError
from . import comfy_bridge as bridge
from .options import apply_options

CATEGORY = "FLUX LoRA"
MAX_STEPS = 1_000_000
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# In-training validation samples: FLUX.1 dev and FLUX.2 dev embed a guidance value; FLUX.2 klein base is undistilled
# and sampled with real CFG against the empty prompt (the scale diffusers' Flux2KleinPipeline defaults to).
DEV_GUIDANCE = {"FLUX.1": 3.5, "FLUX.2": 4.0}
KLEIN_CFG_SCALE = 4.0
KONTEXT_GUIDANCE = 2.5  # FLUX.1 Kontext dev edits (ComfyUI's Kontext templates: FluxGuidance 2.5)
log = logging.getLogger(__name__)


def configs(rank, alpha, learning_rate, steps, optimizer, timestep_sampling, guidance, seed, checkpoint_every,
            compute_dtype: str) -> tuple[LoraConfig, TrainConfig]:
    """The node's widgets as trainer_core settings, validated before anything heavy is loaded."""
    lora_cfg = LoraConfig(rank=rank, alpha=alpha).validate()
    train_cfg = TrainConfig(steps=steps, learning_rate=learning_rate, optimizer=optimizer,
                            timestep_sampling=timestep_sampling, guidance=guidance, seed=seed,
                            checkpoint_every=checkpoint_every, compute_dtype=compute_dtype).validate()
    return lora_cfg, train_cfg


class FluxLoraTrain:
    DESCRIPTION = ("Trains a LoRA on the weights of the connected FLUX.1 or FLUX.2 MODEL (the family is read from "
                   "the MODEL). Shows loss and progress on the node; "
                   "Cancel saves a resumable checkpoint. The LoRA goes to output/loras (LoraLoader lists it) and "
                   "comes out applied to the MODEL, ready for KSampler.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "LOSS_MAP", "STRING", "CLIP")
    RETURN_NAMES = ("model", "lora", "loss", "lora_name", "clip")
    OUTPUT_TOOLTIPS = (
        "The input MODEL with the trained LoRA applied through ComfyUI's LoRA patching (connect to KSampler).",
        "The LoRA weights (for Load LoRA Model / LoraModelLoader).",
        "Loss per step (for Plot Loss Graph / LossGraphNode).",
        "The LoRA's file name in output/loras, as LoraLoader lists it.",
        "The clip input with the text-encoder LoRA applied (FLUX LoRA Options text_encoders); unchanged when no "
        "text encoder was trained, empty when clip is not connected.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "FLUX.1 dev or schnell, or FLUX.2 klein base or dev, from Load "
                                               "Diffusion Model (UNETLoader); LoRAs "
                                               "already applied to it are merged into the base. Training shares "
                                               "the MODEL's weights in RAM rather than copying them (the MODEL "
                                               "is left unchanged); an fp8_e4m3fn MODEL trains on an fp8 base, its "
                                               "own fp8 weights. Copied are only: weights a LoRA on the MODEL "
                                               "patches (new merged values), quantized weights, weights in another "
                                               "dtype than training stores them in (fp8_e5m2, bf16 weights on a CPU "
                                               "that trains in fp32, a base_precision other than the MODEL's), "
                                               "blocks the trainer swaps (packed into one host buffer each), and "
                                               "small parts (the final modulation, an fp8 MODEL's norms, biases "
                                               "and embedders)."}),
                "cache": ("FLUX_LORA_CACHE", {"tooltip": "From FLUX LoRA Cache."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256,
                                 "tooltip": "LoRA rank: capacity and file size. 8–32 suits a subject or style."}),
                "alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1024.0, "step": 0.5,
                                    "tooltip": "LoRA alpha; the update is scaled by alpha / rank. Equal to rank "
                                               "is the usual choice."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 10.0, "step": 1e-5,
                                            "round": 1e-7,
                                            "tooltip": "Step size of the optimizer; 1e-4 is typical for FLUX "
                                                       "LoRAs, lower if the loss jumps around."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": MAX_STEPS,
                                  "tooltip": "Optimizer steps to train to (with resume: the total, not extra)."}),
                "optimizer": (list(OPTIMIZERS), {"default": "adamw",
                                                 "tooltip": "The optimizer. The 8-bit ones (bitsandbytes) need less memory; prodigy "
                                                            "adapts its own step size (set learning_rate 1.0)."}),
                "timestep_sampling": (list(TIMESTEP_SAMPLERS), {
                    "default": "flux_shift",
                    "tooltip": "How noise levels are drawn: flux_shift follows FLUX's resolution-dependent "
                               "schedule; sigmoid/shift/uniform are the other common choices."}),
                "guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1,
                                       "tooltip": "Guidance value fed to FLUX.1 dev and FLUX.2 dev while training "
                                                  "(1.0 is the common choice; ignored by schnell and klein)."}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 2**63 - 1, "control_after_generate": False,
                                 "tooltip": "Seeds LoRA init, noise and data order. Keep it fixed to resume."}),
                "checkpoint_every": ("INT", {"default": 250, "min": 0, "max": MAX_STEPS,
                                             "tooltip": "Save a resumable checkpoint every N steps (0 = only on "
                                                        "Cancel and at the end)."}),
                "output_name": ("STRING", {"default": "flux_lora", "multiline": False,
                                           "tooltip": "File name in output/loras. An existing file is never "
                                                      "overwritten: a new run gets _001, _002…"}),
                "resume": ("BOOLEAN", {"default": False,
                                       "tooltip": "Continue the run called output_name from its newest checkpoint "
                                                  "(e.g. after Cancel), with the same settings."}),
            },
            "optional": {
                "options": ("FLUX_LORA_OPTIONS", {"tooltip": "Recipe settings from FLUX LoRA Options (targets, "
                                                             "algorithm, schedule, loss, EMA, export formats…)."}),
                "memory": ("FLUX_LORA_MEMORY", {"tooltip": "Memory settings (precision, block swap, "
                                                           "checkpointing). Default: bf16 base, everything on the "
                                                           "GPU."}),
                "clip": ("CLIP", {"tooltip": "The text encoders FLUX LoRA Cache uses (FLUX.1: DualCLIPLoader, type "
                                             "flux; FLUX.2: Load CLIP, type flux2), needed only by the options "
                                             "shuffle_tags and text_encoders (FLUX.1 only), which encode captions "
                                             "during training."}),
                "sample_every": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS,
                                         "tooltip": "Draw a validation sample into the preview every N steps and at "
                                                    "the end (0 = loss curve only). Each costs 20 sampling steps."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, cache, rank, alpha, learning_rate, steps, optimizer, timestep_sampling, guidance, seed,
              checkpoint_every, output_name, resume, options=None, memory=None, clip=None, sample_every=0,
              unique_id=None):
        import comfy.model_management as mm

        from ..trainer_core.fileio import safe_output_name
        from ..trainer_core.lora import read_lora_file
        from ..trainer_core.memory.precision import STORAGE_DTYPES
        from ..trainer_core.train import train_lora
        from .memory import host_preflight

        _check_cache(cache)
        family, variant = bridge.model_family(model), bridge.flux_variant(model)
        if cache.family is not None and cache.family is not family:
            raise TrainerInputError(
                f"cache: FLUX LoRA Cache encoded the images with a {cache.family.name} VAE, but the model is "
                f"{family.name} {variant}. Connect the VAE and text encoder of the model you train to FLUX LoRA Cache.")
        device = bridge.training_device()
        dtype_name = bridge.compute_dtype_name(device)
        lora_cfg, train_cfg = configs(rank, alpha, learning_rate, steps, optimizer, timestep_sampling, guidance, seed,
                                      checkpoint_every, dtype_name)
        lora_cfg, train_cfg = apply_options(lora_cfg, train_cfg, options)
        name = safe_output_name(output_name)
        _, output_dir = bridge.comfy_folders()
        loras_dir = output_dir / "loras"
        validation = self._validation(cache, sample_every, variant, family)

        make_bar, send_text, check_interrupt = bridge.comfy_progress(unique_id)
        send_text("loading the model for training…")
        bridge.free_vram()
        dtype = DTYPES[dtype_name]
        text_encoder = _training_text_encoder(clip, lora_cfg, train_cfg, dtype, family)
        memory = base_memory(memory, bridge.flux_weight_precision(model))
        host_preflight(model, memory, cache.cache, lora_cfg, train_cfg, device)
        precision = memory.base_precision if memory is not None else "auto"
        storage = STORAGE_DTYPES.get(precision)
        # device=None: the trainer's base weights are the MODEL's own tensors where ComfyUI keeps them, not copies
        # (also those already in the base's storage dtype, e.g. the fp8 weights of an fp8 MODEL)
        transformer = family.load_transformer(bridge.flux_state_dict(model, dtype, storage), dtype=dtype,
                                              device=None, base_precision=precision if storage is not None else None)
        decoder = bridge.ComfyImageEncoder(cache.vae).decode if validation and cache.vae is not None else None
        progress = bridge.NodeProgress(make_bar(train_cfg.steps), send_text, check_interrupt, decoder)
        try:
            result = train_lora(
                transformer, cache.cache, lora_cfg=lora_cfg, train_cfg=train_cfg, output_dir=loras_dir,
                output_name=name, mem_cfg=memory, resume=resume,
                checkpoint_root=output_dir / bridge.WORK_FOLDER / "checkpoints", validation=validation,
                metadata={"base_model": f"{family.name} {variant} (ComfyUI MODEL)", "trigger_word": cache.trigger_word,
                          "resolutions": ",".join(map(str, cache.resolutions))},
                callbacks=progress, device=device, text_encoder=text_encoder,
            )
        except BaseException as exc:
            if isinstance(exc, mm.InterruptProcessingException):
                kept = f"checkpoint {progress.checkpoint.name} kept" if progress.checkpoint else "no checkpoint"
                send_text(f"cancelled at step {progress.step}: {kept}. Queue again with resume on to continue "
                          f"'{name}'.")
            # ComfyUI keeps the error for its report; its traceback must not keep the trainer's model alive.
            traceback.clear_frames(exc.__traceback__)
            raise
        else:
            bridge.log_base_sharing(transformer, model)
        finally:
            del transformer, text_encoder
            bridge.release()
        lora, _ = read_lora_file(result.lora_path)
        lora_name = result.lora_path.relative_to(loras_dir).as_posix()
        send_text(f"done: {lora_name} · {result.steps} steps"
                  + (f" (resumed at {result.resumed_from})" if result.resumed_from else "")
                  + f" · final loss {result.losses[-1]:.4f}")
        model_out, clip_out = bridge.models_with_lora(model, clip, lora)
        return (model_out, lora, {"loss": list(result.losses)}, lora_name, clip_out)

    @staticmethod
    def _validation(cache, sample_every: int, variant: str, family=None):
        from ..trainer_core.models.family import FLUX1
        from ..trainer_core.train import ValidationPrompts, validation_controls

        family = family or FLUX1
        if not sample_every:
            return None
        embeddings = list(cache.prompts) or [cache.cache.text(0)]
        width, height = cache.cache.sizes[0]
        klein = variant == "klein"
        edit = cache.cache.control_count > 0  # an edit LoRA samples with a training control
        if klein:
            guidance = KLEIN_CFG_SCALE  # the CFG scale for klein (trainer_core.train.sample_validation)
        elif variant == "dev":
            guidance = KONTEXT_GUIDANCE if edit and family is FLUX1 else DEV_GUIDANCE[family.name]
        else:
            guidance = 1.0
        config = SampleConfig(prompts=list(cache.prompt_texts), every=sample_every, width=width, height=height,
                              guidance=guidance).validate()
        controls = (validation_controls(cache.cache, list(cache.prompt_texts) or [cache.cache.captions[0]])
                    if edit else [])
        return ValidationPrompts(embeddings, config, negative=cache.cache.empty_text() if klein else None,
                                 controls=controls)


def _training_text_encoder(clip, lora_cfg: LoraConfig, train_cfg: TrainConfig, dtype: torch.dtype, family=None):
    """The text encoder the options need during training, or None: a trainable copy of FLUX.1's encoders for
    text-encoder LoRAs, else ComfyUI's own CLIP for encoding shuffled captions."""
    if lora_cfg.text_encoders == "none" and not train_cfg.shuffle_tags:
        return None
    if clip is None:
        what = (f"text_encoders = '{lora_cfg.text_encoders}'" if lora_cfg.text_encoders != "none"
                else "shuffle_tags")
        raise TrainerInputError(f"clip: the option {what} encodes captions during training, and FLUX LoRA Train's "
                                f"clip input is not connected. Connect the CLIP from DualCLIPLoader (the one FLUX "
                                f"LoRA Cache uses), or turn the option off in FLUX LoRA Options.")
    if lora_cfg.text_encoders == "none":
        return bridge.ComfyTextEncoder(clip, family)
    if family is not None and family.name != "FLUX.1":
        raise TrainerInputError(f"options: text_encoders = '{lora_cfg.text_encoders}' trains FLUX.1's CLIP-L / T5; "
                                f"{family.name} has another text encoder, which the pack does not train yet. Set "
                                f"text_encoders to 'none' on FLUX LoRA Options.")
    return bridge.flux_text_encoder(clip, dtype, with_t5=lora_cfg.text_encoders != "clip_l" or train_cfg.shuffle_tags)


def base_memory(memory: MemoryConfig | None, weight_precision: str | None) -> MemoryConfig | None:
    """The memory settings to train with: a MODEL ComfyUI holds in fp8 trains on an fp8 base (its own tensors,
    cast on use) where the settings leave base_precision to "auto" — upcasting would copy the whole base into a
    larger dtype for the same values. A base_precision the user chose is kept."""
    if weight_precision is None:
        return memory
    memory = memory or MemoryConfig()
    if memory.preset == "none" and memory.base_precision == "auto":
        log.info("the MODEL's weights are %s: training on an %s base (its own tensors)", weight_precision,
                 weight_precision)
        return dataclasses.replace(memory, base_precision=weight_precision)
    return memory


def _check_cache(cache) -> None:
    if cache is None or not len(cache.cache):
        raise TrainerInputError("cache: it holds no items. Connect FLUX LoRA Cache with a non-empty dataset.")
