"""FluxLoraOptions: the recipe settings beyond FluxLoraTrain's own widgets → FLUX_LORA_OPTIONS.

Its output is a plain dict of trainer_core ``LoraConfig`` / ``TrainConfig`` field values; FluxLoraTrain applies it
over its own widgets, and trainer_core validates every value (a bad one is refused, never ignored).
"""

from __future__ import annotations

import dataclasses

from ..trainer_core.config import ALGORITHMS, LOSS_TYPES, SCHEDULERS, TEXT_ENCODER_TARGETS, LoraConfig, TrainConfig
from ..trainer_core.errors import TrainerInputError
from . import comfy_bridge as bridge

CATEGORY = "FLUX LoRA"
NO_LORA = "none"
TARGET_CHOICES = ("attention+ffs", "attention", "mmdit", "all", "all+ffs", "context", "context+ffs", "tiny", "nano",
                  "regex")


def _lora_choices() -> list[str]:
    """"none" and the LoRAs ComfyUI lists (models/loras, output/loras and extra paths); only "none" outside it."""
    try:
        import folder_paths
    except ImportError:
        return [NO_LORA]
    return [NO_LORA, *folder_paths.get_filename_list("loras")]


def _betas(text: str) -> list[float]:
    if not text.strip():
        return []
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError as exc:
        raise TrainerInputError(f"betas: '{text}' is not two numbers like '0.9, 0.999'.") from exc
    if len(values) != 2:
        raise TrainerInputError(f"betas: give two numbers like '0.9, 0.999', got '{text}'.")
    return values


def options_from_widgets(targets, targets_regex, algorithm, use_dora, lokr_factor, rank_pattern, alpha_pattern,
                         init_from, export_kohya, export_comfy, scheduler, warmup_steps, scheduler_cycles,
                         scheduler_power, weight_decay, betas, eps, optimizer_args, max_grad_norm, batch_size,
                         gradient_accumulation, loss_type, huber_c, caption_dropout, ema_decay, shuffle_tags,
                         keep_tags, text_encoders, text_encoder_rank, text_encoder_alpha, text_encoder_lr) -> dict:
    """The widgets as ``{"lora": {...}, "train": {...}}`` field values, each section checked by its config."""
    if targets == "regex" and not targets_regex.strip():
        raise TrainerInputError("targets_regex: targets is 'regex' but no regex was given, e.g. "
                                r"'transformer_blocks\.\d+\.attn\.to_(q|k|v)'.")
    lora = {
        "targets": targets_regex.strip() if targets == "regex" else targets,
        "algorithm": algorithm, "use_dora": use_dora, "lokr_factor": lokr_factor,
        "rank_pattern": rank_pattern.strip(), "alpha_pattern": alpha_pattern.strip(),
        "init_from": "" if init_from == NO_LORA else str(bridge.lora_file(init_from, "init_from")),
        "export_formats": [f for f, on in (("kohya", export_kohya), ("comfy", export_comfy)) if on],
        "text_encoders": text_encoders, "text_encoder_rank": text_encoder_rank,
        "text_encoder_alpha": text_encoder_alpha,
    }
    train = {
        "scheduler": scheduler, "warmup_steps": warmup_steps, "scheduler_cycles": scheduler_cycles,
        "scheduler_power": scheduler_power, "weight_decay": weight_decay, "betas": _betas(betas), "eps": eps,
        "optimizer_args": optimizer_args.strip(), "max_grad_norm": max_grad_norm, "batch_size": batch_size,
        "gradient_accumulation": gradient_accumulation, "loss_type": loss_type, "huber_c": huber_c,
        "caption_dropout": caption_dropout, "ema_decay": ema_decay, "shuffle_tags": shuffle_tags,
        "keep_tags": keep_tags, "text_encoder_lr": text_encoder_lr,
    }
    dataclasses.replace(LoraConfig(), **lora).validate()
    dataclasses.replace(TrainConfig(), **train).validate()
    return {"lora": lora, "train": train}


def apply_options(lora_cfg: LoraConfig, train_cfg: TrainConfig, options: dict | None):
    """FluxLoraTrain's configs with the options node's values on top (validated again)."""
    if not options:
        return lora_cfg, train_cfg
    return (dataclasses.replace(lora_cfg, **options.get("lora", {})).validate(),
            dataclasses.replace(train_cfg, **options.get("train", {})).validate())


class FluxLoraOptions:
    DESCRIPTION = ("Recipe settings beyond FLUX LoRA Train's own: targets, algorithm (LoRA/DoRA/LoKr/LoHa/OFT), "
                   "schedule, optimizer details, loss, caption dropout and tag shuffling, EMA, text-encoder LoRAs "
                   "and extra export formats. Connect to FLUX LoRA Train's options input.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("FLUX_LORA_OPTIONS",)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("Settings for FLUX LoRA Train's options input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "targets": (list(TARGET_CHOICES), {
                "default": "attention+ffs",
                "tooltip": "Layers that get a LoRA. attention+ffs: attention and feed-forward of every block; "
                           "attention: attention only; mmdit: double-block attention; all: + projections and "
                           "modulation; all+ffs; context / context+ffs: text stream; tiny / nano: one or two single "
                           "blocks; regex: the pattern below."}),
            "targets_regex": ("STRING", {"default": "", "tooltip": "With targets = regex: a regex over full module "
                                                                   "names, e.g. transformer_blocks\\.\\d+\\.attn\\.to_q"}),
            "algorithm": (list(ALGORITHMS), {
                "default": "lora",
                "tooltip": "Adapter type (peft). OFT is saved as full weight differences — large files, since "
                           "ComfyUI has no compact OFT format matching peft's. LoKr/LoHa export to kohya/comfy "
                           "formats only where no fused q/k/v layer is targeted."}),
            "use_dora": ("BOOLEAN", {"default": False, "tooltip": "DoRA: also learn a per-row magnitude "
                                                                  "(algorithm lora only)."}),
            "lokr_factor": ("INT", {"default": -1, "min": -1, "max": 64,
                                    "tooltip": "LoKr Kronecker factor; -1 = as square as possible."}),
            "rank_pattern": ("STRING", {"default": "", "tooltip": "Per-layer ranks: 'regex=rank, …', e.g. "
                                                                  "'proj_mlp=8'."}),
            "alpha_pattern": ("STRING", {"default": "", "tooltip": "Per-layer alphas, same form."}),
            "init_from": (_lora_choices(), {"default": NO_LORA,
                                            "tooltip": "Warm start from a LoRA in ComfyUI's list (this pack's, "
                                                       "kohya or ComfyUI format) with the same targets; none = "
                                                       "start fresh."}),
            "export_kohya": ("BOOLEAN", {"default": False, "tooltip": "Also write <name>_kohya.safetensors "
                                                                      "(lora_unet_… keys, fused q/k/v)."}),
            "export_comfy": ("BOOLEAN", {"default": False, "tooltip": "Also write <name>_comfy.safetensors "
                                                                      "(diffusion_model.… keys)."}),
            "scheduler": (list(SCHEDULERS), {"default": "constant", "tooltip": "Learning-rate schedule."}),
            "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                     "tooltip": "Steps of linear warm-up (schedules with warm-up)."}),
            "scheduler_cycles": ("INT", {"default": 1, "min": 1, "max": 100,
                                         "tooltip": "cosine_with_restarts: number of cycles."}),
            "scheduler_power": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1,
                                          "tooltip": "polynomial: decay power."}),
            "weight_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                       "tooltip": "Decoupled weight decay of the LoRA weights."}),
            "betas": ("STRING", {"default": "", "tooltip": "Two optimizer betas, '0.9, 0.999'; empty = the "
                                                           "optimizer's defaults (not for Adafactor)."}),
            "eps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e-3, "step": 1e-9, "round": 1e-10,
                              "tooltip": "Optimizer epsilon; 0 = its default (not for Lion/Adafactor)."}),
            "optimizer_args": ("STRING", {"default": "", "tooltip": "Extra optimizer settings 'name=value, …', "
                                                                    "e.g. 'd_coef=2, safeguard_warmup=True'."}),
            "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                        "tooltip": "Gradient clipping norm; 0 = off."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "Images per step (a memory preset may set its own)."}),
            "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 256,
                                              "tooltip": "Batches summed into one optimizer step."}),
            "loss_type": (list(LOSS_TYPES), {"default": "l2", "tooltip": "Loss on the velocity error."}),
            "huber_c": ("FLOAT", {"default": 0.1, "min": 0.001, "max": 10.0, "step": 0.01,
                                  "tooltip": "huber / smooth_l1: where the loss turns from quadratic to linear."}),
            "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                                          "tooltip": "Chance a sample trains with an empty caption (needs the "
                                                     "Cache node's empty caption, cached automatically)."}),
            "ema_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9999, "step": 0.0001,
                                    "tooltip": "EMA of the LoRA weights, saved as <name>_ema; 0 = off, typical "
                                               "0.999."}),
            "shuffle_tags": ("BOOLEAN", {"default": False,
                                         "tooltip": "Shuffle comma-separated caption tags every time a caption is "
                                                    "used. Needs FLUX LoRA Train's clip input: shuffled captions "
                                                    "are encoded during training (the text encoders stay loaded)."}),
            "keep_tags": ("INT", {"default": 1, "min": 0, "max": 32,
                                  "tooltip": "shuffle_tags: leading tags that keep their place (1 keeps the trigger "
                                             "word first)."}),
            "text_encoders": (list(TEXT_ENCODER_TARGETS), {
                "default": "none",
                "tooltip": "Also train a LoRA on FLUX.1's text encoders: clip_l, t5 or both. Needs FLUX LoRA "
                           "Train's clip input (DualCLIPLoader type flux); its clip output carries the result. "
                           "Training T5-XXL needs ~10 GB more memory."}),
            "text_encoder_rank": ("INT", {"default": 8, "min": 1, "max": 256,
                                          "tooltip": "Rank of the text-encoder LoRAs."}),
            "text_encoder_alpha": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 1024.0, "step": 0.5,
                                             "tooltip": "Alpha of the text-encoder LoRAs."}),
            "text_encoder_lr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 1e-6, "round": 1e-8,
                                          "tooltip": "Learning rate of the text-encoder LoRAs; 0 = the "
                                                     "transformer's (typical: 1e-5, a tenth of it)."}),
        }}

    def build(self, targets, targets_regex, algorithm, use_dora, lokr_factor, rank_pattern, alpha_pattern, init_from,
              export_kohya, export_comfy, scheduler, warmup_steps, scheduler_cycles, scheduler_power, weight_decay,
              betas, eps, optimizer_args, max_grad_norm, batch_size, gradient_accumulation, loss_type, huber_c,
              caption_dropout, ema_decay, shuffle_tags, keep_tags, text_encoders, text_encoder_rank,
              text_encoder_alpha, text_encoder_lr):
        widgets = dict(locals())
        del widgets["self"]
        return (options_from_widgets(**widgets),)
