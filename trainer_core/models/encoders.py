"""FLUX.1's encoders from local files — the FLUX VAE, CLIP-L and T5-XXL — behind the two small protocols the cache
calls: images → model-space latents, captions → (T5 hidden states, CLIP-L pooled).

Nothing here contacts a hub: folders load with ``local_files_only``, single files (as found in ComfyUI's
models/vae and models/text_encoders) are built from the configs shipped in ``configs/`` with the sizes read from
the tensors, and tokenizers load from a folder on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from functools import cached_property
from pathlib import Path
from typing import Protocol, Sequence, Union

import torch

from ..errors import TrainerInputError
from .flux import CONFIG_DIR, TensorReader, open_safetensors

log = logging.getLogger(__name__)

FLUX_VAE_SHIFT = 0.1159
FLUX_VAE_SCALE = 0.3611
LATENT_CHANNELS = 16

PathLike = Union[str, Path]


def to_model_space(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents → the latents FLUX is trained on: ``(z − shift) · scale``."""
    return (z - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE


def from_model_space(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_space` (before decoding)."""
    return z / FLUX_VAE_SCALE + FLUX_VAE_SHIFT


class ImageEncoder(Protocol):
    identity: str  # changes when the weights change (part of the latent cache key)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in 0..1 → model-space latents [B, 16, H/8, W/8] (posterior mean)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """model-space latents [B, 16, h, w] → float images [B, 3, 8h, 8w] in 0..1."""


class TextEncoder(Protocol):
    identity: str

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions → (T5 hidden states [B, L, D], CLIP-L pooled [B, P])."""


def weights_fingerprint(*modules: torch.nn.Module, extra: Sequence[str] = ()) -> str:
    """Hash of the modules' tensor names, shapes, dtypes and up to 1024 evenly spaced values per tensor.

    Sampled rather than hashing every byte, so a 9 GB T5 costs milliseconds: any other checkpoint or any training
    changes the samples; a hand edit of a single element might not.
    """
    digest = hashlib.sha256("\n".join(extra).encode())
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            count = min(flat.numel(), 1024)
            # integer spacing: float32 linspace rounds past the last index on tensors over 2**24 elements
            picks = torch.arange(count, device=flat.device) * max(flat.numel() - 1, 0) // max(count - 1, 1)
            digest.update(f"{index}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(flat[picks].double().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def _default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


# ---------------------------------------------------------------------------------------------------------------
# VAE

class DiffusersVAE:
    """:class:`ImageEncoder` over a diffusers ``AutoencoderKL`` with FLUX's 16 latent channels.

    Runs on the VAE's device and dtype; results come back on the input's device (latents in the VAE's dtype,
    images in float32).
    """

    def __init__(self, vae):
        channels = vae.config.latent_channels
        if channels != LATENT_CHANNELS:
            raise TrainerInputError(_latent_channels_message(channels, "the VAE"))
        self.vae = vae

    @cached_property
    def identity(self) -> str:
        return "diffusers-vae:" + weights_fingerprint(self.vae)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 8 or images.shape[3] % 8:
            raise TrainerInputError(f"VAE input must be [B, 3, H, W] with H and W multiples of 8; got "
                                    f"{tuple(images.shape)}.")
        device, dtype = _model_device_dtype(self.vae)
        x = images.to(device=device, dtype=dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.mean
        return to_model_space(z.float()).to(device=images.device, dtype=dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        device, dtype = _model_device_dtype(self.vae)
        z = from_model_space(latents.float()).to(device=device, dtype=dtype)
        x = self.vae.decode(z).sample
        return ((x.float() + 1) / 2).clamp(0, 1).to(latents.device)


def _latent_channels_message(channels: int, what: str) -> str:
    return (f"{what} has {channels} latent channels; FLUX.1 needs its own 16-channel VAE (ae.safetensors, or the "
            "vae/ folder of the FLUX.1 repo). An SD 1.x/SDXL VAE has 4 channels, an SD3 VAE 16 but other factors.")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainerInputError(f"{path} is not readable JSON ({exc}); restore or re-download it.") from exc


def _config_folder(folder: Path, sub: str, what: str) -> Path:
    """``folder`` or ``folder/sub`` — whichever holds a config.json."""
    for candidate in (folder, folder / sub):
        if (candidate / "config.json").is_file():
            return candidate
    raise TrainerInputError(f"{what} folder {folder} has no config.json (nor {sub}/config.json); give the "
                            f"model folder or its .safetensors file.")


def _ldm_vae_config(src: TensorReader) -> dict:
    """FLUX VAE config (configs/flux-vae.json) with the sizes of this LDM/BFL-format checkpoint."""
    config = _read_json(CONFIG_DIR / "flux-vae.json")
    levels = sorted({int(m.group(1)) for k in src.keys if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in src.keys if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    config.update(
        in_channels=src.shape("encoder.conv_in.weight")[1],
        out_channels=src.shape("decoder.conv_out.weight")[0],
        latent_channels=src.shape("decoder.conv_in.weight")[1],
        block_out_channels=[src.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels],
        layers_per_block=len(blocks),
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        use_quant_conv="quant_conv.weight" in src.keys,
        use_post_quant_conv="post_quant_conv.weight" in src.keys,
    )
    return config


def _load_vae_file(path: Path, dtype: torch.dtype, device):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    # diffusers' own LDM→diffusers VAE key converter; the config it needs comes from our shipped facts + shapes.
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with open_safetensors(path, "VAE file") as handle:
        src = TensorReader.from_file(handle, path, prefix="vae.")
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in src.keys and (path.parent / "config.json").is_file():
            return _load_vae_folder(path.parent, dtype, device)
        if "decoder.conv_in.weight" not in src.keys or "encoder.conv_in.weight" not in src.keys:
            found = ", ".join(sorted(src.keys)[:3]) or "no tensors"
            raise TrainerInputError(f"{path} is not a VAE (found {found}); choose the FLUX VAE, ae.safetensors "
                                    "(ComfyUI models/vae).")
        if "encoder.down.0.block.0.conv1.weight" not in src.keys:
            raise TrainerInputError(f"{path} holds a diffusers-format VAE without its config.json beside it; give "
                                    "the diffusers vae/ folder or the BFL ae.safetensors file.")
        channels = src.shape("decoder.conv_in.weight")[1]
        if channels != LATENT_CHANNELS:
            raise TrainerInputError(_latent_channels_message(channels, str(path)))
        config = _ldm_vae_config(src)
        sd = {k: src.get(k).to(device=device, dtype=dtype) for k in src.keys}
    sd = convert_ldm_vae_checkpoint(sd, config)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    expected = vae.state_dict()
    wrong = [k for k, v in expected.items() if k not in sd or tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise TrainerInputError(f"{path}: {len(wrong)} VAE tensors are missing or of another shape (e.g. "
                                f"{', '.join(wrong[:3])}); the file is incomplete or not the FLUX VAE — use "
                                "ae.safetensors.")
    vae.load_state_dict({k: sd[k] for k in expected}, strict=True, assign=True)
    return vae.eval()


def _load_vae_folder(folder: Path, dtype: torch.dtype, device):
    from diffusers import AutoencoderKL

    folder = _config_folder(folder, "vae", "VAE")
    config = _read_json(folder / "config.json")
    if config.get("_class_name") != "AutoencoderKL":
        flux2 = (" — the FLUX.2 VAE, which only FLUX.2 transformers take; a FLUX.1 transformer needs the FLUX.1 VAE"
                 if config.get("_class_name") == "AutoencoderKLFlux2" else "")
        raise TrainerInputError(f"{folder / 'config.json'} describes a {config.get('_class_name')}, not the FLUX "
                                f"VAE (AutoencoderKL){flux2}.")
    if config.get("latent_channels") != LATENT_CHANNELS:
        raise TrainerInputError(_latent_channels_message(config.get("latent_channels"), str(folder)))
    return load_pretrained_vae(AutoencoderKL, folder, dtype, "VAE").to(device).eval()


def load_pretrained_vae(vae_class, folder: Path, dtype: torch.dtype, what: str):
    """``vae_class.from_pretrained(folder)``, refusing a damaged or incomplete weight file naming ``what``."""
    try:
        vae, info = vae_class.from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                              output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise TrainerInputError(f"Could not load the {what} from {folder}: {exc}. Check that its weight file is "
                                "complete.") from exc
    _refuse_missing_weights(info, folder, what)
    return vae


def _refuse_missing_weights(info: dict, folder: Path, what: str) -> None:
    """A folder whose weights lack tensors the model needs loads them as random numbers, silently: refuse it."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise TrainerInputError(
            f"{folder}: the {what} weights lack {len(missing)} of the model's tensors (e.g. {', '.join(missing[:3])}); "
            f"they would be random. The folder holds another model or an incomplete download — give the {what} "
            f"folder (or file) and download it again if in doubt.")


def load_vae(path: PathLike, dtype: torch.dtype | None = None, device="cpu") -> DiffusersVAE:
    """The FLUX VAE from a BFL ``ae.safetensors`` file or a diffusers folder (``config.json`` or ``vae/``).

    ``dtype`` defaults to bf16 on CUDA and fp32 elsewhere. Refuses VAEs without 16 latent channels.
    """
    path = Path(path).expanduser()
    dtype = dtype or _default_dtype(device)
    if path.is_dir():
        return DiffusersVAE(_load_vae_folder(path, dtype, device))
    return DiffusersVAE(_load_vae_file(path, dtype, device))


# ---------------------------------------------------------------------------------------------------------------
# Text encoders

class FluxTextEncoder:
    """:class:`TextEncoder` as FLUX.1 uses it: T5-XXL last hidden state + CLIP-L pooled output.

    Tokenised like diffusers' FluxPipeline (padded to the maximum length, truncated, no attention mask). Results are
    on the encoders' device in their dtype.
    """

    def __init__(self, clip_model, clip_tokenizer, t5_model, t5_tokenizer, t5_max_length: int = 512):
        if t5_max_length < 1:
            raise TrainerInputError(f"t5_max_length must be ≥ 1, got {t5_max_length}.")
        self.clip_model, self.clip_tokenizer = clip_model, clip_tokenizer
        self.t5_model, self.t5_tokenizer = t5_model, t5_tokenizer
        self.t5_max_length = t5_max_length
        self.clip_max_length = clip_model.config.max_position_embeddings

    @cached_property
    def identity(self) -> str:
        tokenizers = hashlib.sha256(
            (self.clip_tokenizer.backend_tokenizer.to_str() + self.t5_tokenizer.backend_tokenizer.to_str()).encode()
        ).hexdigest()
        return "flux-text:" + weights_fingerprint(
            self.clip_model, self.t5_model,
            extra=(tokenizers, f"clip_max_length={self.clip_max_length}", f"t5_max_length={self.t5_max_length}"))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = list(captions)
        clip_ids = self.clip_tokenizer(captions, padding="max_length", max_length=self.clip_max_length,
                                       truncation=True, return_tensors="pt").input_ids
        t5_ids = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_max_length,
                                   truncation=True, return_tensors="pt").input_ids
        probe = self.t5_tokenizer(captions, truncation=True, max_length=self.t5_max_length + 1).input_ids
        if any(len(ids) > self.t5_max_length for ids in probe):
            log.warning("a caption is longer than %d T5 tokens; the rest is cut off", self.t5_max_length)
        clip_device = next(self.clip_model.parameters()).device
        t5_device = next(self.t5_model.parameters()).device
        pooled = self.clip_model(clip_ids.to(clip_device)).pooler_output
        hidden = self.t5_model(t5_ids.to(t5_device)).last_hidden_state
        return hidden, pooled


_TOKENIZER_SUBDIRS = {  # where tokenizers usually sit: our layout, the diffusers FLUX repo, ComfyUI's source tree
    "clip": ("clip", "tokenizer", "clip_tokenizer", "sd1_tokenizer"),
    "t5": ("t5", "tokenizer_2", "t5_tokenizer", "text_encoders/t5_tokenizer"),
}
_TOKENIZER_FILES = {"clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
                    "t5": (("tokenizer.json",), ("spiece.model",))}
_NAMES = {"clip": "CLIP-L", "t5": "T5-XXL"}
_TOKENIZER_MODEL = {"clip": "BPE", "t5": "Unigram"}


def _tokenizer_candidates(kind: str, model_path: Path, tokenizer_dir: Path | None) -> list[Path]:
    bases = [tokenizer_dir] if tokenizer_dir else []
    if model_path.is_dir():
        # a transformers folder holds its tokenizer; a diffusers text_encoder/ folder has tokenizer/ beside it
        bases += [model_path, model_path.parent]
    else:
        bases.append(model_path.parent)
    out: list[Path] = []
    for base in bases:
        for candidate in [base, *(base / sub for sub in _TOKENIZER_SUBDIRS[kind])]:
            if candidate not in out:
                out.append(candidate)
    return out


def _has_tokenizer(folder: Path, kind: str) -> bool:
    return any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_FILES[kind])


def load_tokenizer(kind: str, model_path: PathLike, tokenizer_dir: PathLike | None = None):
    """The ``"clip"`` or ``"t5"`` tokenizer from ``tokenizer_dir`` (``clip/``, ``t5/``, diffusers' ``tokenizer/``,
    ``tokenizer_2/``, …) or from beside the model; a clear error lists where it looked."""
    from transformers import CLIPTokenizer, T5Tokenizer

    model_path = Path(model_path).expanduser()
    tokenizer_dir = Path(tokenizer_dir).expanduser() if tokenizer_dir else None
    if tokenizer_dir and not tokenizer_dir.is_dir():
        raise TrainerInputError(f"tokenizer folder not found: {tokenizer_dir}. Give a folder with clip/ and t5/ "
                                "tokenizer subfolders (or leave it empty to look beside the text encoders).")
    candidates = _tokenizer_candidates(kind, model_path, tokenizer_dir)
    folder = next((c for c in candidates if _has_tokenizer(c, kind)), None)
    if folder is None:
        files = " or ".join(" + ".join(f) for f in _TOKENIZER_FILES[kind])
        raise TrainerInputError(
            f"No {_NAMES[kind]} tokenizer found (needs {files}); looked in: {', '.join(map(str, candidates))}. Put "
            f"the tokenizer files in <tokenizers>/{_TOKENIZER_SUBDIRS[kind][0]}/ — e.g. copy the FLUX.1 repo's "
            f"{_TOKENIZER_SUBDIRS[kind][1]}/ folder — and set the tokenizers folder.")
    if (folder / "tokenizer.json").is_file():
        # transformers rebuilds CLIP's or T5's pipeline around whatever vocabulary it finds: check the kind first
        model_type = _read_json(folder / "tokenizer.json").get("model", {}).get("type")
        if model_type != _TOKENIZER_MODEL[kind]:
            raise TrainerInputError(f"{folder} holds a {model_type} tokenizer, not {_NAMES[kind]}'s "
                                    f"{_TOKENIZER_MODEL[kind]}: the CLIP and T5 tokenizers are swapped or wrong.")
    cls = CLIPTokenizer if kind == "clip" else T5Tokenizer
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # whatever the tokenizer library raises on a damaged file
        raise TrainerInputError(f"Could not read the {_NAMES[kind]} tokenizer in {folder} ({type(exc).__name__}: "
                                f"{exc}); put the {_NAMES[kind]} tokenizer files there.") from exc


def _clip_config(src: TensorReader) -> dict:
    """CLIP-L config (configs/clip-l.json) with the sizes of this checkpoint (head dim 64, as in every CLIP)."""
    config = _read_json(CONFIG_DIR / "clip-l.json")
    vocab, hidden = src.shape("embeddings.token_embedding.weight")
    layers = {int(m.group(1)) for k in src.keys if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    config.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers),
                  num_attention_heads=max(hidden // 64, 1),
                  intermediate_size=src.shape("encoder.layers.0.mlp.fc1.weight")[0],
                  max_position_embeddings=src.shape("embeddings.position_embedding.weight")[0])
    return config


def _t5_config(src: TensorReader) -> dict:
    """T5-XXL encoder config (configs/t5-xxl.json) with the sizes of this checkpoint."""
    config = _read_json(CONFIG_DIR / "t5-xxl.json")
    embed = "shared.weight" if "shared.weight" in src.keys else "encoder.embed_tokens.weight"
    vocab, d_model = src.shape(embed)
    layers = {int(m.group(1)) for k in src.keys if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    buckets, heads = src.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in src.keys
    ff = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    config.update(vocab_size=vocab, d_model=d_model, num_layers=len(layers), num_heads=heads,
                  relative_attention_num_buckets=buckets,
                  d_kv=src.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
                  d_ff=src.shape(ff)[0], feed_forward_proj="gated-gelu" if gated else "relu")
    return config


_ENCODERS = {
    # kind: (what, key that marks the format, config builder, prefix in ComfyUI-style files)
    "clip": ("CLIP-L text encoder", "embeddings.token_embedding.weight", _clip_config, "text_model."),
    "t5": ("T5-XXL text encoder", "encoder.block.0.layer.0.SelfAttention.q.weight", _t5_config, ""),
}


def _load_encoder_file(kind: str, path: Path, dtype: torch.dtype, device):
    with open_safetensors(path, f"{_ENCODERS[kind][0]} file") as handle:
        return _build_encoder(kind, TensorReader.from_file(handle, path, prefix=_ENCODERS[kind][3]), dtype, device)


def _build_encoder(kind: str, src: TensorReader, dtype: torch.dtype, device):
    """A transformers CLIPTextModel / T5EncoderModel sized and filled from ``src`` (a file or a state dict)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    what, marker, make_config, _ = _ENCODERS[kind]
    if marker not in src.keys:
        found = ", ".join(sorted(src.keys)[:3]) or "no tensors"
        example = "clip_l" if kind == "clip" else "t5xxl"
        raise TrainerInputError(f"{src.name} is not a {what} (found {found}); choose the {example} file from "
                                "ComfyUI models/text_encoders.")
    config = make_config(src)
    with init_empty_weights():
        if kind == "clip":
            model = CLIPTextModel(CLIPTextConfig(**config))
        else:
            model = T5EncoderModel(T5Config(**config))
    expected = model.state_dict()
    sd = {}
    for key in expected:
        source_key = key
        if kind == "t5" and key in ("shared.weight", "encoder.embed_tokens.weight") and key not in src.keys:
            source_key = "encoder.embed_tokens.weight" if key == "shared.weight" else "shared.weight"
        if source_key not in src.keys:
            raise TrainerInputError(f"{src.name}: tensor '{key}' of the {what} is missing; the file is incomplete or "
                                    "another model — download it again.")
        if tuple(src.shape(source_key)) != tuple(expected[key].shape):
            raise TrainerInputError(f"{src.name}: '{key}' has shape {src.shape(source_key)}, expected "
                                    f"{tuple(expected[key].shape)}; this is not a standard {what}.")
        sd[key] = src.get(source_key).to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    if kind == "t5":
        model.tie_weights()  # shared.weight and encoder.embed_tokens.weight are one tensor
    return model.eval()


_MODEL_TYPES = {"clip": ("clip_text_model", "clip"), "t5": ("t5", "umt5")}  # config.json model_type per kind


def _load_encoder_folder(kind: str, folder: Path, dtype: torch.dtype, device):
    from transformers import CLIPTextModel, T5EncoderModel

    what = _ENCODERS[kind][0]
    folder = _config_folder(folder, "text_encoder" if kind == "clip" else "text_encoder_2", what)
    model_type = _read_json(folder / "config.json").get("model_type")
    if model_type not in _MODEL_TYPES[kind]:
        raise TrainerInputError(f"{folder} holds a '{model_type}' model, not the {what} (model_type "
                                f"{' or '.join(_MODEL_TYPES[kind])}); the CLIP-L and T5 folders may be swapped.")
    cls = CLIPTextModel if kind == "clip" else T5EncoderModel
    try:
        model, info = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise TrainerInputError(f"Could not load the {what} from {folder}: {exc}.") from exc
    _refuse_missing_weights(info, folder, what)
    return model.to(device).eval()


def load_text_encoder(kind: str, path: PathLike, dtype: torch.dtype, device="cpu"):
    """CLIP-L (``kind="clip"``) or T5-XXL (``"t5"``) from a .safetensors file or a transformers folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_encoder_folder(kind, path, dtype, device)
    return _load_encoder_file(kind, path, dtype, device)


def load_text_encoders(clip_path: PathLike, t5_path: PathLike, tokenizer_dir: PathLike | None = None,
                       t5_max_length: int = 512, dtype: torch.dtype | None = None, device="cpu") -> FluxTextEncoder:
    """CLIP-L + T5-XXL (files as in ComfyUI models/text_encoders, or transformers folders) and their tokenizers.

    Tokenizers come from ``tokenizer_dir`` (``clip/`` and ``t5/``, or diffusers' ``tokenizer/`` and
    ``tokenizer_2/``) or from beside the models. ``dtype`` defaults to bf16 on CUDA and fp32 elsewhere (T5-XXL
    overflows in fp16). Use ``t5_max_length`` 512 for dev, 256 for schnell.
    """
    dtype = dtype or _default_dtype(device)
    for kind, path in (("clip", clip_path), ("t5", t5_path)):
        if not Path(path).expanduser().exists():
            raise TrainerInputError(f"{_ENCODERS[kind][0]} not found: {path}. Check the path (ComfyUI keeps them in "
                                    "models/text_encoders).")
    clip_tokenizer = load_tokenizer("clip", clip_path, tokenizer_dir)
    t5_tokenizer = load_tokenizer("t5", t5_path, tokenizer_dir)
    clip = load_text_encoder("clip", clip_path, dtype, device)
    t5 = load_text_encoder("t5", t5_path, dtype, device)
    return _text_encoder(clip, clip_tokenizer, t5, t5_tokenizer, t5_max_length)


def text_encoders_from_state_dicts(clip_sd: dict[str, torch.Tensor], t5_sd: dict[str, torch.Tensor] | None,
                                   tokenizer_dir: PathLike, t5_max_length: int = 512, dtype: torch.dtype | None = None,
                                   device="cpu") -> FluxTextEncoder:
    """As :func:`load_text_encoders`, from in-memory CLIP-L (``text_model.…`` keys) and T5-XXL (``encoder.…``)
    weights — e.g. a ComfyUI CLIP's — with tokenizers from ``tokenizer_dir``. ``t5_sd=None`` leaves T5 out
    (``t5_model`` None), for training a CLIP-L LoRA without holding T5-XXL's ~10 GB."""
    dtype = dtype or _default_dtype(device)
    tokenizer_dir = Path(tokenizer_dir)
    clip_tokenizer = load_tokenizer("clip", tokenizer_dir, tokenizer_dir)
    t5_tokenizer = load_tokenizer("t5", tokenizer_dir, tokenizer_dir)
    clip = _build_encoder("clip", TensorReader.from_dict(clip_sd, "CLIP-L weights", prefix="text_model."), dtype,
                          device)
    t5 = None if t5_sd is None else _build_encoder("t5", TensorReader.from_dict(t5_sd, "T5-XXL weights", prefix=""),
                                                   dtype, device)
    return _text_encoder(clip, clip_tokenizer, t5, t5_tokenizer, t5_max_length)


def _text_encoder(clip, clip_tokenizer, t5, t5_tokenizer, t5_max_length: int) -> FluxTextEncoder:
    for tokenizer, model, kind in ((clip_tokenizer, clip, "clip"), (t5_tokenizer, t5, "t5")):
        if model is not None and len(tokenizer) > model.config.vocab_size:
            raise TrainerInputError(f"The {_NAMES[kind]} tokenizer has {len(tokenizer)} tokens but the model only "
                                    f"{model.config.vocab_size}: it belongs to another model; use the "
                                    f"{_NAMES[kind]} tokenizer.")
    # CLIP pools at the first EOS token: use the tokenizer's EOS id (configs may carry the legacy value 2)
    clip.config.eos_token_id = clip.eos_token_id = clip_tokenizer.eos_token_id
    return FluxTextEncoder(clip, clip_tokenizer, t5, t5_tokenizer, t5_max_length)
