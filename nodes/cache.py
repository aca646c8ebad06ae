"""FluxLoraCache: encode the dataset once with ComfyUI's own VAE and text encoders → FLUX_LORA_CACHE."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..trainer_core.errors import TrainerInputError
from . import comfy_bridge as bridge

CATEGORY = "FLUX LoRA"


@dataclass
class TrainingData:
    """What flows on a FLUX_LORA_CACHE wire: the encoded dataset, encoded validation prompts, and the VAE that
    turns validation samples into preview images."""

    cache: Any  # trainer_core LatentCache
    prompts: list = field(default_factory=list)  # (hidden [L, D], pooled [P]) per validation prompt
    prompt_texts: list[str] = field(default_factory=list)
    vae: Any = None
    trigger_word: str = ""
    resolutions: list[int] = field(default_factory=list)
    family: Any = None  # trainer_core ModelFamily the latents are for (read from the VAE)

    def __repr__(self) -> str:
        return f"TrainingData({len(self.cache)} items, {len(self.prompts)} validation prompts)"


def split_prompts(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


class FluxLoraCache:
    DESCRIPTION = ("Encodes every training image with the VAE and every caption with the text encoders, once, into "
                   "a disk cache keyed by content (a re-run reuses what is there), then frees them for training.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("FLUX_LORA_CACHE",)
    RETURN_NAMES = ("cache",)
    OUTPUT_TOOLTIPS = ("Latents and text embeddings of the dataset; connect to FLUX LoRA Train.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": ("FLUX_LORA_DATASET", {"tooltip": "From FLUX LoRA Dataset."}),
                "vae": ("VAE", {"tooltip": "The VAE of the model you train, from Load VAE: FLUX.1's "
                                           "ae.safetensors or FLUX.2's flux2-vae.safetensors (the family is "
                                           "read from it)."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoders: FLUX.1's from DualCLIPLoader (clip_l + "
                                             "t5xxl, type flux), FLUX.2's from Load CLIP (type flux2: qwen_3_4b "
                                             "for klein 4B, mistral_3_small for dev)."}),
            },
            "optional": {
                "validation_prompts": ("STRING", {
                    "default": "", "multiline": True,
                    "tooltip": "Prompts for the preview samples FLUX LoRA Train draws every 'sample_every' steps, "
                               "one per line (include the trigger word). Empty = the first caption."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def encode(self, dataset, vae, clip, validation_prompts="", unique_id=None):
        from ..trainer_core.data.cache import build_cache, build_prompt_cache

        if not dataset.items:
            raise TrainerInputError("dataset: it holds no images. Add images to the dataset folder.")
        folders = bridge.comfy_folders()
        if folders is None:
            raise TrainerInputError("FLUX LoRA Cache runs inside ComfyUI only.")
        cache_dir = folders[1] / bridge.WORK_FOLDER / "cache"
        make_bar, send_text, _ = bridge.comfy_progress(unique_id)
        image_encoder = bridge.ComfyImageEncoder(vae)
        text_encoder = bridge.ComfyTextEncoder(clip, image_encoder.family)
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            bar = bar or make_bar(total)
            bar.update_absolute(done, total)
            send_text(f"encoding {done}/{total}")

        cache = build_cache(dataset.items, image_encoder, text_encoder, cache_dir, progress=progress,
                            empty_caption=True)  # one extra text entry: lets the options node use caption dropout
        texts = split_prompts(validation_prompts)
        prompts = build_prompt_cache(texts, text_encoder, cache_dir)
        bridge.free_vram()  # the encoders are done; training wants the memory
        send_text(f"{len(cache)} items from {dataset.source}: {cache.reused} cache files reused, "
                  f"{cache.encoded} encoded")
        return (TrainingData(cache, prompts, texts, vae, dataset.config.trigger_word,
                             list(dataset.config.resolutions), image_encoder.family),)
