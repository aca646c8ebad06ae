"""Model families: what differs between FLUX.1 and FLUX.2, behind one small interface.

The objective and the loop (``flow.py``, ``train.py``) are family-agnostic: they ask the family of the transformer
how to pack latents into tokens, build position ids, call the transformer, and how far to shift σ at a
resolution. Loading, target presets and the estimator's model also come from here. The family is detected from
the weights — a module, a state dict's keys, or a diffusers config — so a user never names it.

:data:`FLUX1` delegates to ``models/flux.py`` (loading, configs); FLUX.1's packing, ids and shift live here as
the family's own methods. :data:`FLUX2` delegates to ``models/flux2.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import TrainerInputError
from . import flux, flux2

SAMPLING_STEPS = 50  # the FLUX pipelines' default step count, for a shift that depends on it (FLUX.2)


class ModelFamily:
    """One model family. Latents are model-space latents in the layout the cache holds: ``[B, C, h, w]``."""

    name: str
    class_name: str  # the diffusers transformer class
    latent_channels: int
    latent_downscale: int  # pixels per latent cell
    target_presets: dict[str, str]  # lora.targets preset name → full-name regex
    single_output: str  # regex of single block {index}'s output projection: the layer "tiny" and "nano" train
    block_lists = ("transformer_blocks", "single_transformer_blocks")  # swappable / checkpointed blocks, in order
    encoder_fields: tuple[str, ...]  # the CLI's [model] fields naming this family's VAE and text encoder(s)
    # Validation samples of some of its models use real classifier-free guidance: cache the negative prompt too.
    uses_negative_prompt = False
    lora_alpha_tensors = True  # the default LoRA file writes each LoRA's alpha (= its rank: scale 1)
    text_encoder_loras: tuple[str, ...] = ()  # lora.text_encoders values this family can train
    activation_coeffs: dict[str, tuple[float, ...]]  # the estimator's per-block activations (memory/estimate.py)
    frozen_coeffs: tuple[float, ...]

    def check_lora_config(self, lora_cfg) -> None:
        """Refuse LoRA settings this family cannot train, before anything is cached or loaded."""
        if lora_cfg.text_encoders != "none" and lora_cfg.text_encoders not in self.text_encoder_loras:
            can = (f"it trains {', '.join(repr(t) for t in self.text_encoder_loras)}" if self.text_encoder_loras
                   else "this trainer trains its transformer only")
            raise TrainerInputError(
                f"lora.text_encoders = '{lora_cfg.text_encoders}' is not available for {self.name} ({can}); set "
                "text_encoders to 'none'.")

    def memory_presets(self, config: Mapping[str, Any]) -> dict[str, dict]:
        """The memory tiers (8gb … 80gb → MemoryConfig knobs) sized for a transformer of this ``config``."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a ``height`` × ``width`` pixel image."""
        return self.latent_channels, height // self.latent_downscale, width // self.latent_downscale

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpack_latents(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    def image_ids(self, height: int, width: int, device=None) -> torch.Tensor:
        raise NotImplementedError

    def text_ids(self, length: int, device=None) -> torch.Tensor:
        raise NotImplementedError

    def reference_ids(self, sizes: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
        """Position ids of reference (control) latents of latent sizes ``sizes`` [(h, w), …], whose tokens follow
        the target's: one block per reference, concatenated, as this family's edit models were trained with and
        ComfyUI's ReferenceLatent feeds them at inference."""
        raise NotImplementedError

    def image_token_count(self, height: int, width: int) -> int:
        raise NotImplementedError

    def resolution_shift(self, image_tokens: int, steps: int = SAMPLING_STEPS) -> float:
        """The shift s (σ' = s·σ / (1 + (s − 1)·σ)) this family's pipelines use at ``image_tokens``."""
        raise NotImplementedError

    def call_transformer(self, transformer, tokens, sigma, hidden, pooled, img_ids, txt_ids, guidance: float,
                         dtype) -> torch.Tensor:
        """Predicted tokens for ``tokens`` at σ (all inputs already on the device in the compute dtype)."""
        raise NotImplementedError

    def check_text_conditioning(self, config: Mapping[str, Any], hidden: torch.Tensor, pooled: torch.Tensor,
                                source: str) -> None:
        """Refuse cached text embeddings (one caption's ``hidden [L, D]``, ``pooled [P]``) this transformer cannot
        take, naming where they came from, before a step fails inside a matmul."""
        raise NotImplementedError

    def diffusers_module_to_bfl(self, name: str, inner_dim: int) -> tuple[str, slice | None]:
        """The BFL module (kohya / ComfyUI LoRA key stem) holding diffusers module ``name`` and its rows in that
        fused weight (None: one to one); ValueError for modules without a counterpart."""
        raise NotImplementedError

    def real_cfg(self, config: Mapping[str, Any]) -> bool:
        """Whether this transformer is sampled with classifier-free guidance against a negative prompt (the
        guidance scale mixes two predictions) rather than with a guidance value it embeds."""
        return False

    def lora_architecture(self, config: Mapping[str, Any]) -> str:
        """``modelspec.architecture`` of a LoRA file for this transformer."""
        raise NotImplementedError

    def load_vae(self, path, device="cpu"):
        """This family's VAE as an ``encoders.ImageEncoder`` (images ⇄ the model-space latents the cache holds)."""
        raise NotImplementedError

    def load_text_encoder(self, paths, device="cpu"):
        """This family's text conditioning as an ``encoders.TextEncoder``, from the CLI's ``ModelPaths``."""
        raise NotImplementedError

    def check_model_paths(self, paths, transformer: str) -> None:
        """Refuse [model] encoder fields of another family, or missing ones of this family, naming both families,
        before anything loads."""
        for other in FAMILIES:
            for field in (f for f in other.encoder_fields if f not in self.encoder_fields):
                if getattr(paths, field):
                    raise TrainerInputError(
                        f"[model] {field}: '{getattr(paths, field)}' is a {other.name} text encoder setting, but "
                        f"transformer '{transformer}' is a {self.name} transformer. {self.name} takes "
                        f"{', '.join(self.encoder_fields)}: remove {field} and set those (or choose a {other.name} "
                        "transformer).")
        for field in self.encoder_fields:
            value = getattr(paths, field)
            if not value:
                raise TrainerInputError(f"[model] {field}: no file given; a {self.name} transformer needs "
                                        f"{', '.join(self.encoder_fields)} — set it in the config file.")
            if not Path(value).expanduser().exists():
                raise TrainerInputError(f"[model] {field}: '{value}' does not exist; check the path in the config.")

    def model_class(self):
        import diffusers

        return getattr(diffusers, self.class_name)

    def check_transformer(self, path: Path) -> None:
        """Refuse an incomplete file of this family from its header (or a folder without its config)."""
        raise NotImplementedError

    def file_config(self, path) -> dict | None:
        """The diffusers config of a file or folder read from its header, for the memory plan made before loading;
        None where the plan waits for the loaded model."""
        raise NotImplementedError

    def load_transformer(self, source, dtype: torch.dtype = torch.bfloat16, device="cpu",
                         base_precision: str | None = None):
        """``base_precision`` (fp8, nf4, int8, bf16): stream the weights straight to it where the family can."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


class Flux1Family(ModelFamily):
    """FLUX.1 dev / schnell: 16-channel /8 latents in 2×2 patches, 3-axis ids, T5 hidden + CLIP-L pooled."""

    name = "FLUX.1"
    class_name = "FluxTransformer2DModel"
    latent_channels = 16
    latent_downscale = 8
    single_output = r"single_transformer_blocks\.{index}\.proj_out"
    encoder_fields = ("vae", "clip_l", "t5")
    text_encoder_loras = ("clip_l", "t5", "both")
    activation_coeffs = flux.ACTIVATION_COEFFS
    frozen_coeffs = flux.FROZEN_COEFFS

    def memory_presets(self, config):
        from ..memory.presets import PRESET_TABLE  # dev and schnell are the same size: one table

        return PRESET_TABLE

    target_presets = flux.TARGET_PRESETS

    def pack_latents(self, latents):
        """[B, C, H, W] → [B, H/2·W/2, 4C]: each token is one 2×2 patch (channel-major, like BFL's rearrange)."""
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack_latents(self, tokens, height, width):
        b, _, d = tokens.shape
        c = d // 4
        x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, height, width)

    def image_ids(self, height, width, device=None):
        """[(H/2)·(W/2), 3] = [0, row, col]."""
        rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
        cols = torch.arange(width // 2, device=device).repeat(height // 2)
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()

    def text_ids(self, length, device=None):
        return torch.zeros(length, 3, device=device)

    def image_token_count(self, height, width):
        return (height // 2) * (width // 2)

    def reference_ids(self, sizes, device=None):
        """FLUX.1 Kontext: id channel 0 = 1. The first reference sits at [1, row, col] (diffusers' Kontext recipe and
        ComfyUI's default "offset" method agree); each later one is placed beside the references before it — to the
        right when that keeps the covered area squarer, else below — as ComfyUI's "offset" method does."""
        blocks, covered_h, covered_w = [], 0, 0
        for h, w in sizes:
            h_offset = w_offset = 0
            if h + covered_h > w + covered_w:
                w_offset = covered_w
            else:
                h_offset = covered_h
            covered_h, covered_w = max(covered_h, h + h_offset), max(covered_w, w + w_offset)
            ids = self.image_ids(h, w, device)
            ids[:, 0] = 1
            ids[:, 1] += (h_offset + 1) // 2  # latent cells → 2×2 patches, rounded as ComfyUI rounds
            ids[:, 2] += (w_offset + 1) // 2
            blocks.append(ids)
        return torch.cat(blocks)

    def resolution_shift(self, image_tokens, steps=SAMPLING_STEPS):
        """e^μ, μ linear from 0.5 at 256 tokens to 1.15 at 4096 tokens (independent of the step count)."""
        return math.exp(0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256))

    def call_transformer(self, transformer, tokens, sigma, hidden, pooled, img_ids, txt_ids, guidance, dtype):
        b = tokens.shape[0]
        guidance_vec = (torch.full((b,), guidance, device=tokens.device, dtype=dtype)
                        if transformer.config.guidance_embeds else None)
        return transformer(hidden_states=tokens, encoder_hidden_states=hidden, pooled_projections=pooled,
                           timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance_vec,
                           return_dict=False)[0]

    def check_text_conditioning(self, config, hidden, pooled, source):
        want = (config["joint_attention_dim"], config["pooled_projection_dim"])
        if hidden.ndim != 2 or pooled.ndim != 1 or (hidden.shape[1], pooled.shape[0]) != want:
            raise TrainerInputError(
                f"{source}: text embeddings are hidden {list(hidden.shape)} + pooled {list(pooled.shape)}, but this "
                f"FLUX.1 transformer takes T5 states {want[0]} wide and a CLIP-L pooled vector of {want[1]}. "
                "Cache the captions with the text encoders of this model (CLIPLoader type flux: clip_l + t5xxl).")

    def diffusers_module_to_bfl(self, name, inner_dim):
        return flux.diffusers_module_to_bfl(name, inner_dim)

    def file_config(self, path):
        return flux.flux_file_config(path)

    def lora_architecture(self, config):
        return "flux-1-dev/lora"

    def load_vae(self, path, device="cpu"):
        from .encoders import load_vae

        return load_vae(path, device=device)

    def load_text_encoder(self, paths, device="cpu"):
        from .encoders import load_text_encoders

        return load_text_encoders(paths.clip_l, paths.t5, tokenizer_dir=paths.tokenizers or None,
                                  t5_max_length=paths.t5_max_length, device=device)

    def load_transformer(self, source, dtype=torch.bfloat16, device="cpu", base_precision=None):
        return flux.load_flux_transformer(source, dtype=dtype, device=device, base_precision=base_precision)

    def check_transformer(self, path: Path) -> None:
        flux.check_flux_transformer(path)


class Flux2Family(ModelFamily):
    """FLUX.2 klein / dev: 128-channel /16 latents one token per cell, 4-axis ids, one stacked text sequence."""

    name = "FLUX.2"
    class_name = flux2.CLASS_NAME
    latent_channels = flux2.LATENT_CHANNELS
    latent_downscale = flux2.LATENT_DOWNSCALE
    target_presets = flux2.TARGET_PRESETS
    single_output = flux2.SINGLE_OUTPUT
    encoder_fields = ("vae", "text_encoder")
    uses_negative_prompt = True  # klein base is undistilled: its samples need real CFG
    lora_alpha_tensors = False  # diffusers' Flux2LoraLoaderMixin.load_lora_weights refuses ".alpha" keys
    activation_coeffs = flux2.ACTIVATION_COEFFS
    frozen_coeffs = flux2.FROZEN_COEFFS

    def memory_presets(self, config):
        return flux2.memory_presets(config)

    def pack_latents(self, latents):
        return flux2.pack_latents(latents)

    def unpack_latents(self, tokens, height, width):
        return flux2.unpack_latents(tokens, height, width)

    def image_ids(self, height, width, device=None):
        return flux2.latent_image_ids(height, width, device)

    def text_ids(self, length, device=None):
        return flux2.text_ids(length, device)

    def image_token_count(self, height, width):
        return height * width

    def reference_ids(self, sizes, device=None):
        return flux2.reference_ids(sizes, device)

    def resolution_shift(self, image_tokens, steps=SAMPLING_STEPS):
        return flux2.resolution_shift(image_tokens, steps)

    def call_transformer(self, transformer, tokens, sigma, hidden, pooled, img_ids, txt_ids, guidance, dtype):
        return flux2.call_transformer(transformer, tokens, sigma, hidden, img_ids, txt_ids, guidance, dtype)

    def check_text_conditioning(self, config, hidden, pooled, source):
        want = config["joint_attention_dim"]
        if hidden.ndim != 2 or hidden.shape[1] != want:
            raise TrainerInputError(
                f"{source}: text embeddings are {list(hidden.shape)}, but this FLUX.2 transformer takes text states "
                f"{want} wide (klein-4B: Qwen3-4B → 7680, klein-9B: Qwen3-8B → 12288, dev: Mistral-3 → 15360). "
                "Cache the captions with this model's text encoder (CLIPLoader type flux2); FLUX.1 embeddings "
                "(T5 + CLIP-L) do not fit FLUX.2.")

    def diffusers_module_to_bfl(self, name, inner_dim):
        return flux2.diffusers_module_to_bfl(name, inner_dim)

    def real_cfg(self, config):
        return not config["guidance_embeds"]  # klein base; dev embeds its guidance value

    def lora_architecture(self, config):
        return "flux-2-dev/lora" if config["guidance_embeds"] else "flux-2-klein/lora"

    def load_vae(self, path, device="cpu"):
        from .flux2_encoders import load_flux2_vae

        return load_flux2_vae(path, device=device)

    def load_text_encoder(self, paths, device="cpu"):
        from .flux2_encoders import load_flux2_text_encoder

        return load_flux2_text_encoder(paths.text_encoder, paths.tokenizers or None, paths.text_max_length,
                                       device=device)

    def file_config(self, path):
        return flux2.flux2_file_config(path)

    def load_transformer(self, source, dtype=torch.bfloat16, device="cpu", base_precision=None):
        return flux2.load_flux2_transformer(source, dtype=dtype, device=device, base_precision=base_precision)

    def check_transformer(self, path: Path) -> None:
        flux2.check_flux2_transformer(path)


FLUX1 = Flux1Family()
FLUX2 = Flux2Family()
FAMILIES = (FLUX1, FLUX2)


def _family_of_keys(keys: Iterable[str], what: str) -> ModelFamily:
    names = {k[len(flux.BFL_PREFIX):] if k.startswith(flux.BFL_PREFIX) else k for k in keys}
    if any(marker in names for marker in flux2.MARKERS):
        return FLUX2
    if names & {"img_in.weight", "x_embedder.weight"}:
        return FLUX1
    guess = flux._guess(names)  # what such a file is (a VAE, a text encoder, a LoRA …), when recognisable
    found = f"it looks like {guess}" if guess else \
        f"found {len(names)} tensors such as {', '.join(sorted(names)[:3]) or 'none'}"
    raise TrainerInputError(
        f"{what} is neither a FLUX.1 nor a FLUX.2 transformer: {found}. "
        "Choose a FLUX.1 (dev, schnell) or FLUX.2 (klein base, dev) transformer from ComfyUI's "
        "models/diffusion_models, or a diffusers transformer folder.")


def detect_family(source: Any, what: str = "transformer") -> ModelFamily:
    """The family of a built transformer (nn.Module), a state dict (or its keys), or a diffusers config dict."""
    if isinstance(source, torch.nn.Module):
        for family in FAMILIES:
            if type(source).__name__ == family.class_name:
                return family
        config = getattr(source, "config", None)
        if isinstance(config, Mapping):  # a subclass or wrapper: decide by its config
            return detect_family(dict(config), what)
        raise TrainerInputError(f"{what}: a {type(source).__name__} is not a FLUX.1 or FLUX.2 transformer.")
    if isinstance(source, Mapping) and source and all(isinstance(v, torch.Tensor) for v in source.values()):
        return _family_of_keys(source.keys(), what)
    if isinstance(source, Mapping):
        if source.get("_class_name") in (f.class_name for f in FAMILIES):
            return next(f for f in FAMILIES if f.class_name == source["_class_name"])
        # Configs without a class name (tiny test models, ``dict(model.config)``): FLUX.2's has fields FLUX.1's lacks.
        return FLUX2 if "timestep_guidance_channels" in source else FLUX1
    return _family_of_keys(source, what)


def source_family(source) -> ModelFamily:
    """The family of a ``.safetensors`` file, a diffusers folder or a state dict, read from keys or config.json
    alone (nothing is loaded)."""
    if isinstance(source, Mapping):
        return detect_family(source)
    path = Path(source).expanduser()
    if path.is_dir():
        config_path = next((p for p in (path / "config.json", path / "transformer" / "config.json") if p.is_file()),
                           None)
        if config_path is None:
            raise TrainerInputError(f"transformer folder {path} has no config.json (nor transformer/config.json); "
                                    "give a diffusers transformer folder or the .safetensors transformer file.")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrainerInputError(f"{config_path} is not readable JSON ({exc}); restore the diffusers folder.") \
                from exc
        return detect_family(config)
    with flux.open_safetensors(path, "transformer file") as handle:
        return _family_of_keys(handle.keys(), str(path))


def check_transformer(path) -> ModelFamily:
    """Refuse a file or folder that is not a complete transformer of its family, reading only its header or config,
    so a wrong file is reported before any slow work (caching); returns the family."""
    family = source_family(path)
    family.check_transformer(Path(path).expanduser())
    return family


def load_transformer(source, dtype: torch.dtype = torch.bfloat16, device="cpu", base_precision: str | None = None):
    """Load a FLUX.1 or FLUX.2 transformer from a ``.safetensors`` file, a diffusers folder or a state dict; the
    family is read from the weights (keys only: nothing is loaded twice)."""
    return source_family(source).load_transformer(source, dtype, device, base_precision)
