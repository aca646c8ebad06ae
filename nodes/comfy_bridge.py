"""Adapters between ComfyUI's objects and trainer_core.

ComfyUI's VAE / CLIP become trainer_core's ``ImageEncoder`` / ``TextEncoder``; a MODEL (ModelPatcher) becomes a
diffusers-named state dict for ``load_flux_transformer``; a trained LoRA becomes a MODEL through ComfyUI's own LoRA patching;
progress, previews and the Cancel button are wired into the trainer's callbacks.

ComfyUI modules are imported inside the functions that need them, so this file (and every node file) imports
without ComfyUI: CI checks the schemas and the adapters with stand-in objects.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..trainer_core.errors import TrainerInputError
from ..trainer_core.metrics import loss_curve_image
from ..trainer_core.models.encoders import LATENT_CHANNELS, from_model_space, to_model_space

if TYPE_CHECKING:  # trainer_core.train pulls in diffusers and peft: only imported when a node trains
    from ..trainer_core.train import StepInfo

log = logging.getLogger(__name__)

ALLOW_PATHS_ENV = "FLUX_LORA_TRAINER_ALLOW_PATHS"  # "1": nodes may read any path (see allowed_roots)
WORK_FOLDER = "flux_lora_training"  # under ComfyUI's output folder: cache/ and checkpoints/
FLUX2_TEXT_TOKENS = 512  # ComfyUI's model_base.Flux2 front-pads shorter text conditioning to this many tokens


# ---------------------------------------------------------------------------------------------------------------
# Folders

def comfy_folders() -> tuple[Path, Path] | None:
    """(input folder, output folder) of the running ComfyUI, or None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return Path(folder_paths.get_input_directory()), Path(folder_paths.get_output_directory())


def subfolders(root: Path | None, extensions: Iterable[str]) -> list[str]:
    """Image folders a user can pick: non-hidden subfolders of ``root`` (two levels) that hold at least one file
    with one of ``extensions``, as relative paths (ComfyUI's own input subfolders such as 3d/ drop out)."""
    if root is None or not root.is_dir():
        return []
    extensions = {e.lower() for e in extensions}

    def folders(parent: Path) -> list[Path]:
        return sorted((p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.name.lower())

    def has_images(folder: Path) -> bool:
        return any(p.suffix.lower() in extensions and p.is_file() for p in folder.iterdir())

    found = []
    for child in folders(root):
        for folder in (child, *folders(child)):
            if has_images(folder):
                found.append(folder.relative_to(root).as_posix())
    return found


def allowed_roots() -> list[Path] | None:
    """The folders a node may read, symlinks resolved: ComfyUI's input and output folders and every model folder
    it knows (``models/`` and the extra paths of each kind). None — anywhere — when ComfyUI was started with
    FLUX_LORA_TRAINER_ALLOW_PATHS=1. Every path a node accepts is checked against these (:func:`check_allowed`)."""
    if os.environ.get(ALLOW_PATHS_ENV, "") == "1":
        return None
    roots = list(comfy_folders() or ())
    try:
        import folder_paths
    except ImportError:
        pass
    else:
        roots.append(Path(folder_paths.models_dir))
        for kind, (paths, _) in folder_paths.folder_names_and_paths.items():
            if kind != "custom_nodes":
                roots += [Path(p) for p in paths]
    return [root.resolve() for root in roots]


def check_allowed(path: Path, field: str) -> Path:
    """``path`` with symlinks resolved, if it lies inside :func:`allowed_roots`; else an error naming ``field``."""
    roots = allowed_roots()
    real = Path(path).resolve()
    if roots is not None and not any(real.is_relative_to(root) for root in roots):
        raise TrainerInputError(
            f"{field}: '{path}' leads outside ComfyUI's input, output and model folders, which is all this server "
            f"lets nodes read. Move the file there, or start ComfyUI with {ALLOW_PATHS_ENV}=1 to allow any path."
        )
    return real


def lora_file(name: str, field: str) -> Path:
    """A LoRA picked from ComfyUI's ``loras`` list (``models/loras``, ``output/loras``, extra paths) → its path."""
    try:
        import folder_paths
    except ImportError:
        raise TrainerInputError(f"{field}: picking a LoRA needs ComfyUI's model folders; run inside ComfyUI.") \
            from None
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise TrainerInputError(f"{field}: '{name}' is not in ComfyUI's LoRA list (models/loras, output/loras). "
                                f"Pick one from the list; refresh the page after adding a file.")
    return check_allowed(Path(path), field)


def resolve_dataset_folder(input_dir: Path, folder: str, custom_folder: str = "") -> Path:
    """The folder to scan: ``custom_folder`` (an absolute path, only when allowed) or ``input_dir/folder``.

    ``folder`` may not climb out of the input folder (``..``, absolute paths); symlinks in it are followed only as
    far as :func:`allowed_roots` allows (checked, for the folder and each file, when the dataset is scanned).
    """
    if custom_folder.strip():
        if os.environ.get(ALLOW_PATHS_ENV, "") != "1":
            raise TrainerInputError(
                f"custom_folder: reading folders outside ComfyUI's input folder is off. Put the images in a "
                f"subfolder of {input_dir} and pick it in 'folder', or start ComfyUI with {ALLOW_PATHS_ENV}=1 "
                f"to allow absolute paths."
            )
        path = Path(custom_folder.strip()).expanduser()
        if not path.is_absolute():
            raise TrainerInputError(f"custom_folder: '{custom_folder}' is not an absolute path; give the full path.")
        return path
    relative = Path(os.path.normpath(folder.strip() or "."))
    if relative == Path(".") or relative.is_absolute() or relative.parts[0] == "..":
        raise TrainerInputError(
            f"folder: '{folder}' is not a subfolder of ComfyUI's input folder ({input_dir}). Create a subfolder "
            f"there with your images and .txt captions, then pick it (refresh the page to list new folders)."
        )
    return input_dir / relative


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints (cache keys): ComfyUI's weights may be quantized tensor subclasses or carry LoRA patches, which
# trainer_core.models.encoders.weights_fingerprint (plain nn.Modules) does not see.

def _tensor_sample(tensor: torch.Tensor) -> bytes:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or not tensor.dtype.is_floating_point:
        return b""  # quantized subclasses: names, shapes and dtypes still count
    flat = tensor.detach().reshape(-1)
    count = min(flat.numel(), 1024)
    # integer spacing: a float32 linspace overshoots the last index of tensors with more than 2**24 elements
    picks = torch.arange(count, device=flat.device) * max(flat.numel() - 1, 0) // max(count - 1, 1)
    return flat[picks].float().cpu().numpy().tobytes()


def fingerprint(state_dict: dict[str, Any], extra: Iterable[str] = ()) -> str:
    """Hash of tensor names, shapes, dtypes and up to 1024 evenly spaced values of each tensor."""
    digest = hashlib.sha256("\n".join(extra).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not torch.is_tensor(tensor):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(_tensor_sample(tensor))
    return digest.hexdigest()[:32]


def _patches_summary(patcher) -> list[str]:
    """LoRAs applied to a ComfyUI model (key, strengths, a sample of their tensors), for the cache key."""
    out = []
    for key, patches in sorted(getattr(patcher, "patches", {}).items()):
        for strength, adapter, strength_model, *_ in patches:
            tensors = getattr(adapter, "weights", adapter if isinstance(adapter, (tuple, list)) else ())
            samples = [hashlib.sha256(_tensor_sample(t)).hexdigest()[:8] for t in tensors if torch.is_tensor(t)]
            out.append(f"{key}:{strength}:{strength_model}:{','.join(samples)}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Encoders

class ComfyImageEncoder:
    """trainer_core ``ImageEncoder`` over a ComfyUI ``VAE`` (VAELoader): [B,3,H,W] 0..1 ⇄ model-space latents.

    ComfyUI's VAE takes and returns IMAGE layout [B,H,W,C]. The family is read from the VAE's latent channels:
    FLUX.1's (16 at /8) returns raw latents (the posterior mean), and FLUX trains on ``(z − shift) · scale``;
    FLUX.2's (128 at /16) already returns the transformer's latents (pixel-shuffled, BatchNorm-normalised).
    """

    def __init__(self, vae):
        from ..trainer_core.models.family import FLUX1, FLUX2

        channels = getattr(vae, "latent_channels", None)
        ratio = getattr(vae, "downscale_ratio", None)
        if channels == FLUX2.latent_channels:
            # ComfyUI's taef2 reports /8 although it encodes to /16: the encoded size is checked in encode()
            self.family = FLUX2
        elif channels == LATENT_CHANNELS and ratio == 8:
            self.family = FLUX1
        else:
            raise TrainerInputError(
                f"vae: this VAE has {channels} latent channels and {ratio}× downscaling; FLUX.1 needs its own VAE "
                f"(16 channels, 8×: ae.safetensors), FLUX.2 its own (128 channels, 16×: flux2-vae.safetensors). "
                f"Load the VAE of the model you train with Load VAE."
            )
        # the cache reads the latent layout from these (trainer_core.data.cache)
        self.latent_channels, self.latent_downscale = self.family.latent_channels, self.family.latent_downscale
        self.vae = vae

    @cached_property
    def identity(self) -> str:
        model = self.vae.first_stage_model
        return "comfy-vae:" + fingerprint(model.state_dict(), extra=[type(model).__name__])

    # ComfyUI's models run under inference mode; the trainer calls decode with autograd on (validation samples).
    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(images.movedim(1, -1).float()).float().cpu()
        if self.family.latent_channels != LATENT_CHANNELS:
            expected = list(self.family.latent_shape(images.shape[-2], images.shape[-1]))
            if list(z.shape[1:]) != expected:
                raise TrainerInputError(
                    f"vae: it encodes a {images.shape[-1]}×{images.shape[-2]} image to latents {list(z.shape[1:])}, "
                    f"but {self.family.name} trains on {expected}. Load {self.family.name}'s own VAE with Load VAE.")
            return z
        return to_model_space(z)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.float()
        images = self.vae.decode(from_model_space(latents) if self.family.latent_channels == LATENT_CHANNELS
                                 else latents)
        return images.float().cpu().movedim(-1, 1).clamp(0, 1)


def escape_prompt(text: str) -> str:
    """Captions are plain text; ComfyUI reads '(word:1.2)' as a weight, so brackets are escaped."""
    return text.replace("(", "\\(").replace(")", "\\)")


class ComfyTextEncoder:
    """trainer_core ``TextEncoder`` over a ComfyUI ``CLIP``: the same conditioning CLIPTextEncode gives.

    FLUX.1 (``family`` FLUX1): a hidden-state tensor plus a ``pooled_output`` (DualCLIPLoader type flux → T5-XXL
    hidden states, CLIP-L pooled). FLUX.2 (FLUX2): the stacked hidden states of CLIPLoader type flux2 (Qwen3 /
    Mistral), no pooled vector; front-padded with zeros to 512 tokens as ComfyUI's ``model_base.Flux2`` pads them
    before the transformer, so training sees the text as sampling does.
    """

    def __init__(self, clip, family=None):
        from ..trainer_core.models.family import FLUX1

        self.clip = clip
        self.family = family or FLUX1

    @cached_property
    def identity(self) -> str:
        model = self.clip.cond_stage_model
        extra = [type(model).__name__, type(self.clip.tokenizer).__name__, repr(getattr(self.clip, "layer_idx", None))]
        if self.family.name != "FLUX.1":  # FLUX.2 entries are padded to 512 tokens: not the FLUX.1 entries of a CLIP
            extra.append(self.family.name)
        return "comfy-clip:" + fingerprint(model.state_dict(), extra + _patches_summary(self.clip.patcher))

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from ..trainer_core.models.family import FLUX2

        hidden, pooled = [], []
        for caption in captions:
            tokens = self.clip.tokenize(escape_prompt(caption))
            conditioning = self.clip.encode_from_tokens_scheduled(tokens)
            cond, extras = conditioning[0][0], conditioning[0][1]
            vector = extras.get("pooled_output")
            if self.family is FLUX2:
                if not torch.is_tensor(cond) or cond.ndim != 3:
                    raise TrainerInputError(
                        "clip: this text encoder's conditioning is no sequence of hidden states, which FLUX.2 needs. "
                        "Load the model's text encoder (klein: qwen_3_4b, dev: mistral_3_small) with Load CLIP, "
                        "type flux2.")
                cond = cond[:1].float().cpu()
                if cond.shape[1] < FLUX2_TEXT_TOKENS:
                    cond = torch.nn.functional.pad(cond, (0, 0, FLUX2_TEXT_TOKENS - cond.shape[1], 0))
                hidden.append(cond)
                pooled.append(torch.zeros(1, 0))
                continue
            if not torch.is_tensor(cond) or cond.ndim != 3 or not torch.is_tensor(vector):
                raise TrainerInputError(
                    "clip: this text encoder's conditioning has no hidden states plus pooled_output, which FLUX.1 "
                    "needs. Load clip_l and t5xxl with DualCLIPLoader (type flux)."
                )
            hidden.append(cond[:1].float().cpu())
            pooled.append(vector[:1].float().cpu())
        length = max(h.shape[1] for h in hidden)
        if any(h.shape[1] != length for h in hidden):
            # ComfyUI pads T5 to ≥256 tokens; a longer caption yields more. Zero rows keep one batch shape.
            log.warning("captions encode to different lengths (%s); shorter ones are zero-padded to %d tokens",
                        sorted({h.shape[1] for h in hidden}), length)
            hidden = [torch.nn.functional.pad(h, (0, 0, 0, length - h.shape[1])) for h in hidden]
        return torch.cat(hidden), torch.cat(pooled)


# ---------------------------------------------------------------------------------------------------------------
# MODEL ⇄ trainer_core

def model_family(model):
    """The trainer_core model family (FLUX.1 or FLUX.2) of a ComfyUI MODEL, from ComfyUI's own model config (its
    detection of FLUX.2 by ``double_stream_modulation_img.lin.weight``); a clear TrainerInputError for others."""
    from ..trainer_core.models.family import FLUX1, FLUX2

    inner = getattr(model, "model", None)
    unet_config = getattr(getattr(inner, "model_config", None), "unet_config", None) or {}
    image_model = unet_config.get("image_model")
    if image_model not in ("flux", "flux2") or not hasattr(inner, "diffusion_model"):
        found = image_model or type(getattr(inner, "diffusion_model", inner)).__name__
        raise TrainerInputError(
            f"model: this is a '{found}' model, not FLUX.1 or FLUX.2. Load a FLUX.1 (dev, schnell) or FLUX.2 "
            f"(klein base, dev) transformer, e.g. flux1-dev.safetensors or flux-2-klein-base-4b.safetensors, with "
            f"Load Diffusion Model (UNETLoader)."
        )
    return FLUX2 if image_model == "flux2" else FLUX1


def flux_variant(model) -> str:
    """"dev" or "schnell" for a FLUX.1 MODEL, "dev" or "klein" for FLUX.2 (only dev embeds guidance); a clear
    TrainerInputError for anything else."""
    from ..trainer_core.models.family import FLUX2

    family = model_family(model)
    guidance = model.model.model_config.unet_config.get("guidance_embed")
    return "dev" if guidance else ("klein" if family is FLUX2 else "schnell")


def flux_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The MODEL's FLUX.1 or FLUX.2 transformer weights in diffusers key names, LoRAs already applied to it merged in.

    ComfyUI's module names are its own and change between releases (0.33.0 made the q/k norms' ``scale`` a
    ``weight``), so they are renamed with ComfyUI's own diffusers key map, ``comfy.utils.flux_to_diffusers``: the
    table that release loads diffusers FLUX files and diffusers LoRAs with, kept in step with its modules.
    The tensors are ComfyUI's own, not copies (see :func:`_shared_weights`): the trainer's base weights share
    their memory with the MODEL, fused q/k/v and linear1 split into views by the key map.
    """
    from ..trainer_core.models.family import FLUX2

    family = model_family(model)
    weights = _shared_weights(model, "diffusion_model.", dtype)
    if not weights:
        raise TrainerInputError("model: the MODEL has no diffusion model weights; connect Load Diffusion Model.")
    import comfy.utils

    unet_config = model.model.model_config.unet_config
    key_map = comfy.utils.flux_to_diffusers(unet_config)
    if family is FLUX2:
        key_map = flux2_key_map(key_map, unet_config)
    return diffusers_layout(weights, key_map, family.name)


def flux2_key_map(comfy_map: dict[str, Any], unet_config: dict) -> dict[str, Any]:
    """{diffusers FLUX.2 name: ComfyUI module name (or fused part)} for ``diffusers_layout``.

    ComfyUI's ``flux_to_diffusers`` names every block weight of FLUX.2 (its fused projections and, in the
    release's own spelling, the q/k norms) but gives FLUX.1's diffusers names to the embedders and has none for
    FLUX.2's global modulations. So ComfyUI's entry is taken for each diffusers FLUX.2 weight it names, and the
    BFL checkpoint name from trainer_core's FLUX.2 layout for the rest (plain weights ComfyUI never renamed).
    """
    from ..trainer_core.models import flux2

    out: dict[str, Any] = {}
    for entry in flux2.bfl_layout(unet_config["depth"], unet_config["depth_single_blocks"],
                                  bool(unet_config.get("guidance_embed")), unet_config["hidden_size"]):
        if entry.diffusers_key in comfy_map:
            out[entry.diffusers_key] = comfy_map[entry.diffusers_key]
        elif entry.rows is not None:
            out[entry.diffusers_key] = (entry.bfl_key, (0, entry.rows.start, entry.rows.stop - entry.rows.start))
        elif entry.swap_halves:
            out[entry.diffusers_key] = (entry.bfl_key, None, lambda w: torch.cat(w.chunk(2)[::-1]))
        else:
            out[entry.diffusers_key] = entry.bfl_key
    return out


# Scales and settings ComfyUI's quantized layers keep beside a weight; _plain has already applied them.
_QUANT_STATE = re.compile(r"\.(comfy_quant|weight_scale|weight_scale_2|input_scale|scale_weight|scale_input)$")


def diffusers_layout(weights: dict[str, torch.Tensor], key_map: dict[str, Any],
                     family_name: str = "FLUX.1") -> dict[str, torch.Tensor]:
    """``weights`` (ComfyUI's FLUX module names) renamed by ``key_map`` ({diffusers name: module name, or
    (module name, (dim, start, length)) for a part of a fused tensor, or (module name, None, function)}).

    The map also lists aliases a LoRA loader accepts (LyCoris names, FLUX.2's fused projections): a tensor FLUX.1
    reads in parts, or already read under an earlier name, is not taken again whole.
    """
    read_in_parts = {target[0] for target in key_map.values() if not isinstance(target, str) and target[1] is not None}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, target in key_map.items():
        source, rows, *convert = (target, None) if isinstance(target, str) else target
        if source not in weights:
            continue
        if rows is None:
            if source in read_in_parts or source in used:
                continue
            value = weights[source]
        else:
            dim, start, length = rows
            value = weights[source].narrow(dim, start, length)
        out[name] = convert[0](value) if convert else value
        used.add(source)
    unmapped = sorted(k for k in set(weights) - used if not _QUANT_STATE.search(k))
    if unmapped:
        raise TrainerInputError(
            f"model: this ComfyUI's FLUX key map (comfy.utils.flux_to_diffusers) names no diffusers weight for "
            f"{len(unmapped)} of the MODEL's weights, e.g. {', '.join(unmapped[:3])}: this ComfyUI release lays "
            f"{family_name} out in a way the pack does not know yet. Use a ComfyUI release the pack lists as "
            f"tested, or report the ComfyUI version to the pack.")
    return out


def _patched_weights(patcher, prefix: str, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """A ModelPatcher's weights under ``prefix`` (prefix removed), LoRAs applied to it merged in, as copies made
    outside inference mode, in ``dtype`` on ``device``: for models the trainer changes (text-encoder LoRAs)."""
    with torch.inference_mode(False), torch.no_grad():
        held = _storages(patcher, prefix)
        return {key: value.to(device=device, dtype=dtype,
                              copy=value.is_inference() or value.untyped_storage().data_ptr() in held)
                for key, value in _merged_weights(patcher, prefix, dtype).items()}


def _merged_weights(patcher, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A ModelPatcher's weights under ``prefix`` (prefix removed) in ``dtype``, LoRAs applied to it merged in (new
    tensors); an unpatched weight already in ``dtype`` is the module's own tensor."""
    patches = getattr(patcher, "patches", None) or {}
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode(False), torch.no_grad():
        if any(key.startswith(prefix) and key_patches for key, key_patches in patches.items()):
            import comfy.lora

            # Original weights (from the backup if the model is currently patched) plus their patches.
            for key, ((weight, convert), *key_patches) in patcher.get_key_patches(prefix).items():
                if key_patches:
                    value = _plain(weight).to(torch.float32, copy=True)
                    value = comfy.lora.calculate_weight(key_patches, convert(value, inplace=True), key).to(dtype)
                else:
                    value = _plain(weight).to(dtype)
                out[key[len(prefix):]] = value
        else:
            for key, weight in patcher.model_state_dict(prefix).items():
                out[key[len(prefix):]] = _plain(weight).to(dtype)
    return out


def _storages(patcher, prefix: str) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in patcher.model_state_dict(prefix).values()}


def _rehome(module: torch.nn.Module) -> None:
    """Replace ``module``'s inference tensors with normal ones: autograd refuses the inference tensors ComfyUI's
    loaders create (and views of them). Each is copied outside inference mode and the copy takes the original's
    place in the module (same dtype, device, layout and values, so ComfyUI samples exactly as before), one tensor
    at a time: the extra memory at any moment is one tensor, and afterwards there is still one copy of the model.
    A new Parameter object, as ComfyUI's own ``set_attr_param`` makes when it patches: ``.data =`` would leave
    the old object's inference-mode version counter in place."""
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for tensors in (sub._parameters, sub._buffers):
                for name, tensor in list(tensors.items()):
                    if tensor is None or type(tensor) not in (torch.Tensor, torch.nn.Parameter) \
                            or not tensor.is_inference():
                        continue  # normal already, or a quantized ComfyUI type (dequantised, i.e. copied, later)
                    value = tensor.detach().clone()
                    if isinstance(tensor, torch.nn.Parameter):
                        value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
                        value.__dict__.update(tensor.__dict__)
                    tensors[name] = value
                    del tensor, value


def _shared_weights(patcher, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A ModelPatcher's weights under ``prefix`` (prefix removed) in ``dtype``, as ComfyUI's own tensors wherever
    they can be: its module is re-homed out of inference mode first (:func:`_rehome`), and a tensor already in
    ``dtype`` is returned as it is, on the device ComfyUI keeps it on.

    Copies remain only where the trainer needs other values than the module holds: a weight a LoRA applied to the
    MODEL patches (the merged weight is new), a quantized ComfyUI tensor type (dequantised), and a weight in another
    dtype than ``dtype`` (e.g. fp8 from Load Diffusion Model's weight_dtype, or bf16 weights when training computes
    in fp32) — the same cases the Train node's tooltip names. (:func:`diffusers_layout` then makes one more small
    copy: the final layer's modulation, whose scale/shift halves diffusers stores the other way round.)
    """
    _rehome(patcher.model.get_submodule(prefix.rstrip(".")))
    out = _merged_weights(patcher, prefix, dtype)
    with torch.inference_mode(False), torch.no_grad():
        for key, value in out.items():  # one the module does not hold (a patch backup) may still be one
            if value.is_inference():
                out[key] = value.clone()
    held = _storages(patcher, prefix)
    copied = [t for t in out.values() if t.untyped_storage().data_ptr() not in held]
    log.info("training on the MODEL's own weights: %d of %d tensors shared, %d copied (%.2f GiB; LoRA-patched, "
             "quantized or not in %s)", len(out) - len(copied), len(out), len(copied),
             sum(t.numel() * t.element_size() for t in copied) / 2**30, dtype)
    return out


COMFY_CLIP_L, COMFY_T5 = "clip_l.transformer.", "t5xxl.transformer."  # key prefixes in a FLUX CLIP
T5_TOKENS = 256  # ComfyUI's FLUX T5 tokenizer pads to 256 tokens: train on the length inference will use


def comfy_tokenizer_folder() -> Path:
    """ComfyUI's source folder that holds its CLIP-L (sd1_tokenizer/) and T5 (text_encoders/t5_tokenizer/)
    tokenizer files."""
    import comfy

    return Path(comfy.__file__).parent


def flux_text_encoder(clip, dtype: torch.dtype, with_t5: bool = True, tokenizer_dir: Path | None = None):
    """A trainable trainer_core ``FluxTextEncoder`` (transformers CLIP-L + T5-XXL) with a ComfyUI CLIP's weights.

    A LoRA on ComfyUI's own text-encoder modules cannot train: their weights are inference tensors that ComfyUI
    may move or cast at any time. So the weights are copied (LoRAs applied to the CLIP merged in) into the
    transformers models trainer_core trains, tokenised with ComfyUI's own tokenizer files. ``with_t5=False`` skips
    T5-XXL (~10 GB) when only CLIP-L is trained.
    """
    from ..trainer_core.models.encoders import text_encoders_from_state_dicts

    patcher = clip.patcher
    keys = patcher.model_state_dict().keys()
    if not all(any(k.startswith(prefix) for k in keys) for prefix in (COMFY_CLIP_L, COMFY_T5)):
        held = sorted({k.split(".")[0] for k in keys}) or ["no text encoder"]
        raise TrainerInputError(
            f"clip: training a text-encoder LoRA needs FLUX.1's text encoders, clip_l and t5xxl (DualCLIPLoader, "
            f"type flux); this CLIP holds {', '.join(held)}. Connect DualCLIPLoader's CLIP to FLUX LoRA Train's clip "
            f"input, or set text_encoders to 'none' on FLUX LoRA Options.")
    clip_sd = _patched_weights(patcher, COMFY_CLIP_L, dtype, "cpu")
    t5_sd = _patched_weights(patcher, COMFY_T5, dtype, "cpu") if with_t5 else None
    return text_encoders_from_state_dicts(clip_sd, t5_sd,
                                          tokenizer_dir or comfy_tokenizer_folder(), t5_max_length=T5_TOKENS,
                                          dtype=dtype)


def _plain(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a ComfyUI weight (its quantized tensor types dequantize themselves)."""
    if type(weight) in (torch.Tensor, torch.nn.Parameter):
        return weight.detach()
    if hasattr(weight, "dequantize"):
        return weight.dequantize()
    raise TrainerInputError(
        f"model: weights of type {type(weight).__name__} cannot be trained on yet; load the bf16 or fp8 "
        f"FLUX.1 file with Load Diffusion Model."
    )


def models_with_lora(model, clip, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """Clones of ``model`` and ``clip`` (None stays None) with ``lora`` applied through ComfyUI's own LoRA patching,
    as LoraLoader does: the transformer keys patch the model, text-encoder keys the CLIP."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, lora, strength, strength if clip is not None else 0)


# ---------------------------------------------------------------------------------------------------------------
# Device and memory

def training_device() -> torch.device:
    import comfy.model_management as mm

    return torch.device(mm.get_torch_device())


def compute_dtype_name(device: torch.device) -> str:
    """bf16 where ComfyUI would run bf16 (modern GPUs), else fp32 (CPU, older GPUs; fp16 training diverges)."""
    import comfy.model_management as mm

    return "bf16" if device.type != "cpu" and mm.should_use_bf16(device) else "fp32"


def free_vram() -> None:
    """Ask ComfyUI to move every loaded model off the GPU before training takes it."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def release() -> None:
    """Return what the trainer held (call after its objects are gone)."""
    import comfy.model_management as mm

    gc.collect()
    mm.soft_empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Progress, previews, interrupt

def image_grid(images: torch.Tensor) -> Image.Image:
    """[N,3,H,W] 0..1 → one PIL image, side by side."""
    row = torch.cat(list(images.float().clamp(0, 1)), dim=2)
    return Image.fromarray((row.permute(1, 2, 0) * 255).round().byte().numpy())


def stack_images(top: Image.Image, bottom: Image.Image | None) -> Image.Image:
    if bottom is None:
        return top
    scale = top.width / bottom.width
    bottom = bottom.resize((top.width, max(1, round(bottom.height * scale))), Image.Resampling.NEAREST)
    out = Image.new("RGB", (top.width, top.height + bottom.height), (255, 255, 255))
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class NodeProgress:
    """The trainer's ``Callbacks`` shown on the node: a progress bar with a preview (loss curve, latest validation
    sample) and a line of text (step, loss, speed, time left). ``check_interrupt`` raises ComfyUI's
    InterruptProcessingException on Cancel; the trainer then saves a checkpoint and re-raises it.

    ``bar`` is a ``comfy.utils.ProgressBar``, ``send_text(text)`` shows text under the node, ``decode`` turns
    model-space latents into images [N,3,H,W] — all passed in so the class works without ComfyUI.
    """

    PREVIEW_SECONDS = 1.0  # at most one loss-curve preview per second: fast GPUs do several steps a second

    def __init__(self, bar, send_text: Callable[[str], None], check_interrupt: Callable[[], None],
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, losses: list[float] | None = None):
        self.bar = bar
        self.send_text = send_text
        self.check_interrupt = check_interrupt
        self.decode = decode
        self.losses: list[float] = list(losses or [])
        self.step = 0
        self.checkpoint: Path | None = None
        self.sample: Image.Image | None = None
        self._last_preview = 0.0
        self._started: float | None = None
        self._first_step: int | None = None

    def preview(self) -> tuple[str, Image.Image, int]:
        return "JPEG", stack_images(loss_curve_image(self.losses, (512, 288)), self.sample), 512

    def on_step(self, info: StepInfo) -> None:
        self.step = info.step
        self.losses.append(info.loss)
        now = time.perf_counter()
        if self._started is None:
            self._started, self._first_step = now - info.seconds_per_step, info.step - 1
        done = info.step - self._first_step
        rate = (now - self._started) / max(done, 1)
        recent = self.losses[-10:]
        self.send_text(f"step {info.step}/{info.total_steps} · loss {info.loss:.4f} (last {len(recent)}: "
                       f"{sum(recent) / len(recent):.4f}) · {rate:.2f} s/step · "
                       f"{_duration(rate * (info.total_steps - info.step))} left")
        show = now - self._last_preview >= self.PREVIEW_SECONDS or info.step == info.total_steps
        if show:
            self._last_preview = now
        self.bar.update_absolute(info.step, info.total_steps, self.preview() if show else None)

    def on_sample(self, step: int, latents: torch.Tensor) -> None:
        if self.decode is None:
            return
        self.sample = image_grid(self.decode(latents))
        self.bar.update_absolute(step, None, self.preview())

    def on_checkpoint(self, path: Path) -> None:
        self.checkpoint = path

    def should_stop(self) -> bool:
        self.check_interrupt()
        return False


def show_text(text: str, node_id: str | None) -> None:
    """Text under the node in the running ComfyUI (nothing outside ComfyUI)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    if node_id is not None and PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, node_id)


def comfy_progress(node_id: str | None):
    """(ProgressBar factory, send_text, check_interrupt) bound to the running ComfyUI and this node."""
    import comfy.model_management as mm
    import comfy.utils

    def bar(total: int):
        return comfy.utils.ProgressBar(total, node_id=node_id)

    def send_text(text: str) -> None:
        show_text(text, node_id)

    return bar, send_text, mm.throw_exception_if_processing_interrupted
