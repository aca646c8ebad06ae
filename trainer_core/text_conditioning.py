"""The text conditioning of each training sample: cached embeddings, or live text encoders.

Cached embeddings serve by default. An encoder is run live, every step, when its LoRA is trained
(``lora.text_encoders``; its cached embeddings would be stale after the first step) or when caption tags are
shuffled (``train.shuffle_tags``; every shuffle is a new caption). Caption dropout trains on the empty caption:
from the cache when nothing runs live.
"""

from __future__ import annotations

import logging
import random

import torch

from . import lora
from .config import LoraConfig, TrainConfig
from .data.cache import LatentCache
from .data.dataset import caption_variant
from .errors import TrainerInputError

log = logging.getLogger(__name__)


class TextConditioning:
    """(hidden [B, L, D], pooled [B, P]) for a batch of cache indices, with the caption options applied."""

    def __init__(self, cache: LatentCache, text_encoder, lora_cfg: LoraConfig, train_cfg: TrainConfig,
                 device: torch.device):
        self.cache, self.text_encoder, self.cfg, self.device = cache, text_encoder, train_cfg, device
        has_models = all(hasattr(text_encoder, a) for a in ("clip_model", "t5_model", "clip_tokenizer"))
        if lora_cfg.text_encoders != "none" and not has_models:
            raise TrainerInputError(
                f"lora.text_encoders = '{lora_cfg.text_encoders}' needs the CLIP-L and T5 text encoders during "
                f"training (their outputs cannot come from the cache), and "
                f"{'none was given' if text_encoder is None else 'the given one does not expose them'}. "
                f"Connect FLUX.1's text encoders (clip_l + t5xxl) to the training step, or set text_encoders to "
                f"'none'."
            )
        if train_cfg.shuffle_tags and not (has_models or hasattr(text_encoder, "encode")):
            raise TrainerInputError(
                "train.shuffle_tags needs the text encoders during training (every shuffle is a new caption, which "
                "the cache does not hold), and none was given. Connect the text encoders to the training step, or "
                "turn shuffle_tags off.")
        self.trained = lora.add_text_encoder_lora(text_encoder, lora_cfg, seed=train_cfg.seed) \
            if lora_cfg.text_encoders != "none" else {}
        self.live_clip = lora.CLIP_PREFIX in self.trained or (train_cfg.shuffle_tags and has_models)
        self.live_t5 = lora.T5_PREFIX in self.trained or (train_cfg.shuffle_tags and has_models)
        # A text encoder given only as a callable (ComfyUI's CLIP): shuffled captions are encoded whole through it.
        self.live_encode = train_cfg.shuffle_tags and not has_models
        for prefix, model in self.trained.items():
            for param in lora.adapter_parameters(model).values():
                param.data = param.data.float()  # fp32 masters; peft computes the LoRA path in their dtype
            log.info("training a LoRA on %s: its text embeddings are computed live each step, not taken from "
                     "the cache", "CLIP-L" if prefix == lora.CLIP_PREFIX else "T5")
        if train_cfg.shuffle_tags:
            log.info("shuffle_tags: captions are encoded live each step (the cache holds the unshuffled ones)")
        for live, model in ((self.live_clip, "clip_model"), (self.live_t5, "t5_model")):
            if live:
                getattr(text_encoder, model).to(device)
        self.empty = None
        if train_cfg.caption_dropout and not (self.live_clip and self.live_t5) and not self.live_encode:
            self.empty = cache.empty_text(text_encoder)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for model in self.trained.values() for p in lora.adapter_parameters(model).values()]

    def batch(self, indices: list[int], generator: torch.Generator,
              shard: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``shard``: the part of the (global) batch ``indices`` this process trains on; captions are drawn for
        the whole batch, so every process draws the same."""
        cfg = self.cfg
        captions = [self.cache.items[i].caption for i in indices]
        if cfg.caption_dropout or cfg.shuffle_tags:
            # Seeded from the run's generator, so a resumed run draws the same captions.
            seed = int(torch.randint(2**62, (1,), generator=generator))
            rng = random.Random(seed)
            captions = [caption_variant(c, rng, cfg.caption_dropout, cfg.shuffle_tags, cfg.keep_tags)
                        for c in captions]
        indices, captions = indices[shard], captions[shard]
        if self.live_encode:
            with torch.inference_mode(False):  # ComfyUI encodes under inference mode; training needs plain tensors
                hidden, pooled = (t.to(self.device).clone() for t in self.text_encoder.encode(captions))
            return hidden, pooled
        cached = [] if self.live_t5 and self.live_clip else [
            self.cache.text(i) if c or self.empty is None else self.empty for i, c in zip(indices, captions)]
        hidden = self._t5(captions) if self.live_t5 else _stack_padded([t[0] for t in cached])
        pooled = self._clip(captions) if self.live_clip else torch.stack([t[1] for t in cached])
        return hidden, pooled

    # Tokenised like FluxTextEncoder.encode (padded to the maximum length, truncated), so live and cached
    # embeddings of an untrained encoder are identical; gradients flow when the encoder carries a LoRA.
    def _clip(self, captions: list[str]) -> torch.Tensor:
        te = self.text_encoder
        return self._live(te.clip_model, te.clip_tokenizer, te.clip_max_length, lora.CLIP_PREFIX,
                          captions).pooler_output

    def _t5(self, captions: list[str]) -> torch.Tensor:
        te = self.text_encoder
        return self._live(te.t5_model, te.t5_tokenizer, te.t5_max_length, lora.T5_PREFIX, captions).last_hidden_state

    def _live(self, model, tokenizer, max_length: int, prefix: str, captions: list[str]):
        ids = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.set_grad_enabled(prefix in self.trained):
            return model(ids.to(self.device))

def _stack_padded(hidden: list[torch.Tensor]) -> torch.Tensor:
    """Stack [L, D] hidden states of different lengths (ComfyUI's T5 grows past 256 tokens for long captions)
    by zero-padding to the longest: FLUX attends to every text token, and zeros carry no content."""
    length = max(h.shape[0] for h in hidden)
    return torch.stack([torch.nn.functional.pad(h, (0, 0, 0, length - h.shape[0])) for h in hidden])
