"""FLUX.2's encoders from local files — its VAE and its text encoder (Qwen3 for klein, Mistral-Small-3 for dev) —
behind the protocols the cache calls (``encoders.ImageEncoder``, ``encoders.TextEncoder``), and tiny offline ones.

What they compute follows diffusers' ``Flux2KleinPipeline`` / ``Flux2Pipeline`` and the FLUX.2 DreamBooth recipes:

* Image → the VAE's posterior mode (32 channels at /8) → 2×2 pixel-unshuffle to 128 channels at /16 → normalised
  by the VAE's BatchNorm running statistics, ``(z − mean) / √(var + eps)``. That is what ComfyUI's FLUX.2 VAE
  encode returns and what the transformer takes; decode is the inverse, then the VAE decoder.
* Caption → chat template → tokens padded to ``max_length`` (512) → hidden states of three layers of the language
  model stacked per token: ``[B, L, 3·hidden]``. klein: Qwen3, the user turn plus the assistant prompt with
  thinking off, layers 9/18/27. dev: Mistral-Small-3, BFL's system message plus the user turn, layers 10/20/30.
  There is no pooled vector (``[B, 0]``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import TrainerInputError
from .encoders import PathLike, _default_dtype, _model_device_dtype, _read_json, _refuse_missing_weights, \
    load_pretrained_vae, weights_fingerprint
from .flux import TensorReader, open_safetensors
from .flux2 import LATENT_CHANNELS, LATENT_DOWNSCALE

log = logging.getLogger(__name__)

VAE_CLASS = "AutoencoderKLFlux2"
VAE_CHANNELS = LATENT_CHANNELS // 4  # before the 2×2 pixel shuffle
MAX_LENGTH = 512  # the pipelines' max_sequence_length; ComfyUI pads FLUX.2 text to 512 as well


# ---------------------------------------------------------------------------------------------------------------
# VAE

class Flux2VAE:
    """:class:`encoders.ImageEncoder` over a diffusers ``AutoencoderKLFlux2``: model-space latents are 128 channels
    at /16, BatchNorm-normalised."""

    latent_channels = LATENT_CHANNELS
    latent_downscale = LATENT_DOWNSCALE

    def __init__(self, vae):
        if type(vae).__name__ != VAE_CLASS or getattr(vae.config, "latent_channels", None) != VAE_CHANNELS:
            raise TrainerInputError(_not_flux2_vae(f"a {type(vae).__name__} with "
                                                   f"{getattr(vae.config, 'latent_channels', '?')} latent channels"))
        self.vae = vae

    @cached_property
    def identity(self) -> str:
        return "flux2-vae:" + weights_fingerprint(self.vae)  # the BatchNorm statistics are buffers: included

    def _statistics(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return mean.to(device, dtype), std.to(device, dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 16 or images.shape[3] % 16:
            raise TrainerInputError(f"FLUX.2 VAE input must be [B, 3, H, W] with H and W multiples of 16; got "
                                    f"{tuple(images.shape)}.")
        device, dtype = _model_device_dtype(self.vae)
        z = self.vae.encode(images.to(device=device, dtype=dtype) * 2 - 1).latent_dist.mode()
        # pixel_unshuffle orders channels c·4 + 2·row + col, as the pipelines' _patchify_latents does
        z = F.pixel_unshuffle(z, 2)
        mean, std = self._statistics(device, z.dtype)
        return ((z - mean) / std).to(device=images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        device, dtype = _model_device_dtype(self.vae)
        mean, std = self._statistics(device, torch.float32)
        z = F.pixel_shuffle(latents.to(device).float() * std + mean, 2)
        x = self.vae.decode(z.to(dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1).to(latents.device)


def _not_flux2_vae(found: str) -> str:
    return (f"the FLUX.2 transformer needs the FLUX.2 VAE ({VAE_CLASS}: 32 latent channels, pixel-shuffled to 128, "
            f"with BatchNorm statistics), but this is {found}. A FLUX.1 VAE (ae.safetensors, 16 channels) does not "
            "fit FLUX.2: give the vae/ folder of a FLUX.2 repo (klein or dev).")


def load_flux2_vae(path: PathLike, dtype: torch.dtype | None = None, device="cpu") -> Flux2VAE:
    """The FLUX.2 VAE from a diffusers folder (``config.json`` or ``vae/config.json``)."""
    from diffusers import AutoencoderKLFlux2

    path = Path(path).expanduser()
    dtype = dtype or _default_dtype(device)
    if not path.is_dir():
        raise TrainerInputError(f"[model] vae: {path} is a file; FLUX.2's VAE is read from a diffusers folder "
                                "(the vae/ folder of a FLUX.2 repo, holding config.json and the weights).")
    folder = next((c for c in (path, path / "vae") if (c / "config.json").is_file()), None)
    if folder is None:
        raise TrainerInputError(f"VAE folder {path} has no config.json (nor vae/config.json); give the vae/ folder of "
                                "a FLUX.2 repo.")
    class_name = _read_json(folder / "config.json").get("_class_name")
    if class_name != VAE_CLASS:
        raise TrainerInputError(f"{folder}: {_not_flux2_vae(f'a {class_name}')}")
    return Flux2VAE(load_pretrained_vae(AutoencoderKLFlux2, folder, dtype, "FLUX.2 VAE").to(device).eval())


# ---------------------------------------------------------------------------------------------------------------
# Text encoder

# model_type → (what, hidden layers stacked, system message): the pipelines' text_encoder_out_layers defaults
_STYLES = {
    "qwen3": ("Qwen3 (FLUX.2 klein)", (9, 18, 27), None),
    "mistral": ("Mistral-Small-3 (FLUX.2 dev)", (10, 20, 30), "dev"),
    "mistral3": ("Mistral-Small-3 (FLUX.2 dev)", (10, 20, 30), "dev"),
}


def _system_message() -> str:
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE  # BFL's, as Flux2Pipeline uses it

    return SYSTEM_MESSAGE


class Flux2TextEncoder:
    """:class:`encoders.TextEncoder` as FLUX.2 uses it: ``(hidden [B, L, 3·H], pooled [B, 0])``.

    ``model``: a transformers Qwen3 or Mistral(3) model (the base model suffices: only hidden states are read);
    ``tokenizer``: its tokenizer with a chat template. Results are on the model's device in its dtype.
    """

    def __init__(self, model, tokenizer, max_length: int = MAX_LENGTH):
        model_type = model.config.model_type
        if model_type not in _STYLES:
            raise TrainerInputError(f"text encoder: a '{model_type}' model is not a FLUX.2 text encoder; FLUX.2 klein "
                                    "uses Qwen3 (qwen_3_4b / qwen_3_8b), FLUX.2 dev Mistral-Small-3.")
        if max_length < 1:
            raise TrainerInputError(f"[model] text_max_length: must be ≥ 1, got {max_length}.")
        self.what, self.layers, system = _STYLES[model_type]
        self.system_message = _system_message() if system else None
        depth = _text_config(model).num_hidden_layers
        if depth < max(self.layers):
            raise TrainerInputError(f"text encoder: this {self.what} has {depth} layers, but FLUX.2 reads hidden "
                                    f"states {'/'.join(map(str, self.layers))}; give the full text encoder.")
        if not getattr(tokenizer, "chat_template", None):
            raise TrainerInputError("text encoder: its tokenizer has no chat template; FLUX.2 encodes prompts as chat "
                                    "messages. Give the tokenizer folder of the FLUX.2 repo (tokenizer/).")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    @property
    def width(self) -> int:
        return len(self.layers) * _text_config(self.model).hidden_size

    @cached_property
    def identity(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        tokenizer = hashlib.sha256(((backend.to_str() if backend else "") + self.tokenizer.chat_template).encode())
        return "flux2-text:" + weights_fingerprint(
            self.model, extra=(tokenizer.hexdigest(), f"layers={self.layers}", f"max_length={self.max_length}"))

    def _tokens(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        if self.system_message is None:  # Flux2KleinPipeline._get_qwen3_prompt_embeds: one prompt at a time
            texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False) for c in captions]
            inputs = tok(texts, return_tensors="pt", padding="max_length", truncation=True,
                         max_length=self.max_length)
        else:  # Flux2Pipeline._get_mistral_3_small_prompt_embeds (format_input: [IMG] removed from the text)
            messages = [[{"role": "system", "content": [{"type": "text", "text": self.system_message}]},
                         {"role": "user", "content": [{"type": "text", "text": c.replace("[IMG]", "")}]}]
                        for c in captions]
            inputs = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                             return_tensors="pt", padding="max_length", truncation=True,
                                             max_length=self.max_length)
        if bool(inputs["attention_mask"][:, -1].any()):
            log.warning("a caption fills all %d text tokens; the rest is cut off", self.max_length)
        return inputs["input_ids"], inputs["attention_mask"]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = list(captions)
        input_ids, attention_mask = self._tokens(captions)
        device, _ = _model_device_dtype(self.model)
        output = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            output_hidden_states=True, use_cache=False)
        stacked = torch.stack([output.hidden_states[k] for k in self.layers], dim=1)  # [B, 3, L, H]
        b, n, length, width = stacked.shape
        hidden = stacked.permute(0, 2, 1, 3).reshape(b, length, n * width)
        return hidden, hidden.new_zeros(b, 0)


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def _qwen3_config(src: TensorReader) -> dict:
    """A Qwen3 config with the sizes of this checkpoint (ComfyUI's qwen_3_4b.safetensors and the like)."""
    layers = {int(m.group(1)) for k in src.keys if (m := re.match(r"layers\.(\d+)\.", k))}
    vocab, hidden = src.shape("embed_tokens.weight")
    head_dim = src.shape("layers.0.self_attn.q_norm.weight")[0]
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers), head_dim=head_dim,
                num_attention_heads=src.shape("layers.0.self_attn.q_proj.weight")[0] // head_dim,
                num_key_value_heads=src.shape("layers.0.self_attn.k_proj.weight")[0] // head_dim,
                intermediate_size=src.shape("layers.0.mlp.gate_proj.weight")[0],
                # Qwen3's published values (not stored in the weights)
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False)


def _load_text_file(path: Path, dtype: torch.dtype, device):
    from accelerate import init_empty_weights
    from transformers import Qwen3Config, Qwen3Model

    with open_safetensors(path, "FLUX.2 text encoder file") as handle:
        src = TensorReader.from_file(handle, path, prefix="model.")
        if "layers.0.self_attn.q_norm.weight" not in src.keys or "embed_tokens.weight" not in src.keys:
            found = ", ".join(sorted(src.keys)[:3]) or "no tensors"
            raise TrainerInputError(
                f"{path} is not a Qwen3 text encoder (found {found}). FLUX.2 klein's text encoder file is "
                "qwen_3_4b (klein-4B) or qwen_3_8b (klein-9B) from ComfyUI models/text_encoders; FLUX.2 dev's "
                "Mistral-Small-3 is read from its transformers folder (text_encoder/).")
        with init_empty_weights():
            model = Qwen3Model(Qwen3Config(**_qwen3_config(src)))
        expected = model.state_dict()
        missing = [k for k in expected if k not in src.keys]
        if missing:
            raise TrainerInputError(f"{path}: {len(missing)} tensors of the Qwen3 text encoder are missing (e.g. "
                                    f"{', '.join(missing[:3])}); the file is incomplete — download it again.")
        sd = {k: src.get(k).to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _load_text_folder(path: Path, dtype: torch.dtype, device):
    from transformers import AutoModel

    folder = next((c for c in (path, path / "text_encoder") if (c / "config.json").is_file()), None)
    if folder is None:
        raise TrainerInputError(f"text encoder folder {path} has no config.json (nor text_encoder/config.json); give "
                                "the text_encoder/ folder of a FLUX.2 repo or ComfyUI's qwen_3_4b file.")
    model_type = _read_json(folder / "config.json").get("model_type")
    if model_type not in _STYLES:
        raise TrainerInputError(f"{folder} holds a '{model_type}' model, not a FLUX.2 text encoder (Qwen3 for klein, "
                                "Mistral-Small-3 for dev). FLUX.1's CLIP-L and T5 belong in [model] clip_l and t5.")
    try:  # the base model: hidden states are all FLUX.2 reads (no language-model head)
        model, info = AutoModel.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise TrainerInputError(f"Could not load the FLUX.2 text encoder from {folder}: {exc}.") from exc
    _refuse_missing_weights(info, folder, "FLUX.2 text encoder")
    return model.to(device).eval()


def load_tokenizer(tokenizer_dir: PathLike | None, model_path: Path):
    """The text encoder's tokenizer from ``tokenizer_dir`` or beside the model (its folder, or diffusers'
    ``tokenizer/`` next to ``text_encoder/``)."""
    from transformers import AutoTokenizer

    bases = [Path(tokenizer_dir).expanduser()] if tokenizer_dir else []
    bases += [model_path, model_path.parent / "tokenizer"] if model_path.is_dir() else [model_path.parent / "tokenizer"]
    candidates = [c for b in bases for c in (b, b / "tokenizer")]
    folder = next((c for c in candidates if (c / "tokenizer.json").is_file()), None)
    if folder is None:
        raise TrainerInputError(f"No FLUX.2 tokenizer found (a folder with tokenizer.json); looked in: "
                                f"{', '.join(map(str, bases))}. Set [model] tokenizer to the FLUX.2 repo's tokenizer/ "
                                "folder.")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # whatever the tokenizer library raises on a damaged folder
        raise TrainerInputError(f"Could not read the tokenizer in {folder} ({type(exc).__name__}: {exc}).") from exc


def load_flux2_text_encoder(path: PathLike, tokenizer_dir: PathLike | None = None, max_length: int = MAX_LENGTH,
                            dtype: torch.dtype | None = None, device="cpu") -> Flux2TextEncoder:
    """Qwen3 (klein) from ComfyUI's single file or a transformers folder, or Mistral-Small-3 (dev) from its
    transformers folder, with its tokenizer. ``dtype`` defaults to bf16 on CUDA and fp32 elsewhere."""
    path = Path(path).expanduser()
    dtype = dtype or _default_dtype(device)
    if not path.exists():
        raise TrainerInputError(f"[model] text_encoder: '{path}' does not exist; check the path (ComfyUI keeps it in "
                                "models/text_encoders).")
    tokenizer = load_tokenizer(tokenizer_dir, path)
    model = _load_text_folder(path, dtype, device) if path.is_dir() else _load_text_file(path, dtype, device)
    vocab = _text_config(model).vocab_size
    if len(tokenizer) > vocab:
        raise TrainerInputError(f"The tokenizer has {len(tokenizer)} tokens but the text encoder only {vocab}: it "
                                "belongs to another model; give this text encoder's tokenizer.")
    return Flux2TextEncoder(model, tokenizer, max_length)


# ---------------------------------------------------------------------------------------------------------------
# Tiny offline encoders for tests and the tiny-models command: a FLUX.2 VAE at width 8 and Qwen3 / Mistral stand-ins
# deep enough for the real layer taps, hidden 16 (klein: 3 × 16 = 48) and 20 (dev: 60), as tiny_flux2_config.

TINY_TEXT_HIDDEN = {"klein": 16, "dev": 20}
TINY_MAX_LENGTH = 96  # the bundled captions in either tiny template (a byte per token) with room to spare
_CHAT_TEMPLATES = {
    # Qwen3's template reduced to what FLUX.2 klein uses: user turns, the assistant prompt, thinking switched off
    "klein": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n"
              "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
              "{% endif %}"),
    # Mistral-Small-3's: a system prompt and [INST] turns whose content is a list of typed parts
    "dev": ("<s>{% for m in messages %}{% set text = m.content if m.content is string else "
            "m.content | map(attribute='text') | join('') %}"
            "{% if m.role == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
            "{% else %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"),
}
_SPECIAL = {"klein": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
            "dev": ["<pad>", "<s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]}


def tiny_chat_tokenizer(variant: str = "klein"):
    """A byte-level tokenizer without merges (one token per byte) with the variant's chat template and specials;
    dev's system message is one added token, so a caption still fits in :data:`TINY_MAX_LENGTH` after it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = _SPECIAL[variant]
    vocab = {tok: i for i, tok in enumerate(special)}
    vocab.update({c: len(special) + i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special)
    if variant == "dev":
        backend.add_tokens([AddedToken(_system_message(), normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=special[0], padding_side="right",
                                   chat_template=_CHAT_TEMPLATES[variant], model_max_length=MAX_LENGTH)


def build_tiny_flux2_text_model(variant: str = "klein", seed: int = 0):
    """A tiny random Qwen3 (klein) or Mistral (dev) base model with the layers FLUX.2 reads."""
    from transformers import MistralConfig, MistralModel, Qwen3Config, Qwen3Model

    hidden = TINY_TEXT_HIDDEN[variant]
    common = dict(vocab_size=len(tiny_chat_tokenizer(variant)), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=MAX_LENGTH,
                  pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if variant == "klein":
            # Qwen3's RoPE θ, which a single file does not record (the file loader assumes it)
            return Qwen3Model(Qwen3Config(num_hidden_layers=28, rope_theta=1_000_000.0, **common)).eval()
        return MistralModel(MistralConfig(num_hidden_layers=31, **common)).eval()


def build_tiny_flux2_text_encoder(variant: str = "klein", seed: int = 0) -> Flux2TextEncoder:
    return Flux2TextEncoder(build_tiny_flux2_text_model(variant, seed), tiny_chat_tokenizer(variant),
                            TINY_MAX_LENGTH)


def build_tiny_flux2_vae(seed: int = 0) -> Flux2VAE:
    """A tiny random ``AutoencoderKLFlux2`` (32 channels at /8) with seeded BatchNorm statistics."""
    from diffusers import AutoencoderKLFlux2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                 latent_channels=VAE_CHANNELS, sample_size=64)
        with torch.no_grad():
            vae.bn.running_mean.normal_(std=0.1)
            vae.bn.running_var.uniform_(0.01, 0.05)  # about the spread of the tiny encoder's random latents
    return Flux2VAE(vae.eval())


# ---------------------------------------------------------------------------------------------------------------
# The tiny klein-shaped models as files, in the formats `train --config` reads (the headless FLUX.2 path on a CPU)

TINY_FLUX2_FILES = {
    "transformer": "flux2-klein-tiny.safetensors",  # BFL keys, as ComfyUI's models/diffusion_models files
    "vae": "vae",  # diffusers AutoencoderKLFlux2 folder
    "text_encoder": "qwen3-tiny.safetensors",  # ComfyUI's qwen_3_4b layout: model.… keys
    "tokenizers": "tokenizer",  # tokenizer.json + chat template
}


def write_tiny_flux2_models(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny klein transformer, FLUX.2 VAE, Qwen3 text encoder and tokenizer into ``folder`` under the
    names of :data:`TINY_FLUX2_FILES`; returns those paths."""
    from ..fileio import save_safetensors
    from .flux2 import build_tiny_flux2_transformer, diffusers_to_bfl

    folder = Path(folder)
    paths = {key: folder / name for key, name in TINY_FLUX2_FILES.items()}
    save_safetensors(diffusers_to_bfl(build_tiny_flux2_transformer("klein", seed=seed).state_dict()),
                     paths["transformer"])
    build_tiny_flux2_vae(seed=seed).vae.save_pretrained(paths["vae"])
    text = build_tiny_flux2_text_encoder("klein", seed=seed)
    save_safetensors({f"model.{k}": v.contiguous() for k, v in text.model.state_dict().items()},
                     paths["text_encoder"])
    text.tokenizer.save_pretrained(paths["tokenizers"])
    return paths
