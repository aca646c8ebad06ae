"""Content-keyed cache of VAE latents and text embeddings, one safetensors file per entry.

Layout inside the cache folder::

    latents/<item key>-<encoder key>.safetensors      "latent"  [16, h/8, w/8] (FLUX.1), [128, h/16, w/16] (FLUX.2)
    text/<caption key>-<encoder key>.safetensors      "hidden"  [L, D] (T5; FLUX.2: stacked LM layers),
                                                      "pooled"  [P] (CLIP-L; FLUX.2: [0])
    masks/<mask key>.safetensors                      "mask"    [1, h/8, w/8] loss weights (dataset.masked_loss)

item key = sha256(preprocessing version, image content hash, bucket size, crop box, flip); caption key =
sha256(caption), so identical captions share one file; encoder key = sha256(encoder identity). The two halves
are kept apart in the name so a fully cached dataset can be used with no encoders at all: the one encoder key
present for every entry is taken.

Files are written once, atomically, and checked (header, names, shapes) before reuse; a damaged file is
encoded again. Tensors are stored in the dtype the encoder returns when that is fp32, bf16 or fp16 (no
silent precision loss, and bf16 encoders keep files half the size); other dtypes (fp64, fp8) are stored as
fp32. Non-finite outputs are refused. :class:`LatentCache` reads a file when an item is used rather than
holding everything in RAM: T5 hidden states alone are 4 MB per caption (512 tokens, bf16).

Encoders receive CPU float32 tensors and own their device placement; results are moved to the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import TrainerInputError
from ..fileio import ensure_writable_dir, save_safetensors
from .dataset import DatasetItem, dataset_fingerprint

if TYPE_CHECKING:
    from ..models.encoders import ImageEncoder, TextEncoder

log = logging.getLogger(__name__)

_TEXT_ENCODERS = "the text encoders (CLI: FLUX.1 model.clip_l and model.t5, FLUX.2 model.text_encoder)"
PREPROCESS_VERSION = 1  # bump when DatasetItem.load_pixels changes, so latents of the old pixels are not reused
TEXT_BATCH = 8
_STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUFFIX = ".safetensors"

Progress = Callable[[int, int], None]


class LatentCache:
    """Cached latents and text embeddings for a list of :class:`DatasetItem` (same order)."""

    def __init__(self, items: Sequence[DatasetItem], latent_files: Sequence[Path], text_files: Sequence[Path],
                 reused: int = 0, encoded: int = 0, mask_files: Sequence[Path | None] | None = None):
        self.items = list(items)
        self._latent_files = list(latent_files)
        self._text_files = list(text_files)
        self._mask_files = list(mask_files) if mask_files is not None else [None] * len(self.items)
        self.reused = reused  # cache files found valid and reused by build_cache
        self.encoded = encoded  # cache files written by build_cache

    def __len__(self) -> int:
        return len(self.items)

    def latent(self, index: int) -> torch.Tensor:
        """Model-space latent [C, h/d, w/d] of item ``index`` (FLUX.1: 16 channels at /8; FLUX.2: 128 at /16)."""
        return _load(self._latent_files[index])["latent"]

    def text(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 hidden states [L, D], CLIP-L pooled [P]) of item ``index``'s caption."""
        tensors = _load(self._text_files[index])
        return tensors["hidden"], tensors["pooled"]

    def mask(self, index: int) -> torch.Tensor | None:
        """Loss weights [1, h/8, w/8] in 0..1 of item ``index`` at latent resolution, or None (no mask)."""
        path = self._mask_files[index]
        return None if path is None else _load(path)["mask"]

    @property
    def has_masks(self) -> bool:
        return any(path is not None for path in self._mask_files)

    def empty_text(self, text_encoder: TextEncoder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, pooled) of the empty caption (caption dropout), from this cache's text encoder: cached by
        ``build_cache(..., empty_caption=True)``, else encoded now with ``text_encoder`` if given."""
        if not self._text_files:
            raise TrainerInputError("cache: it holds no captions; add images to the dataset folder.")
        text_dir = self._text_files[0].parent
        enc = self._text_files[0].name[: -len(_SUFFIX)].partition("-")[2]
        path = text_dir / f"{text_key('')}-{enc}{_SUFFIX}"
        if not (path.is_file() and _valid(path, _text_shape_check)):
            if text_encoder is None or encoder_key(text_encoder.identity) != enc:
                raise TrainerInputError(
                    "train.caption_dropout: the cache has no embedding of the empty caption. Build the cache with "
                    "caption dropout on (empty_caption=True), or give the training step the text encoders."
                )
            return build_prompt_cache([""], text_encoder, text_dir.parent)[0]
        tensors = _load(path)
        return tensors["hidden"], tensors["pooled"]

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) in px of each item's bucket."""
        return [(item.width, item.height) for item in self.items]

    @property
    def repeats(self) -> list[int]:
        return [item.repeats for item in self.items]

    @property
    def fingerprint(self) -> str:
        return dataset_fingerprint(self.items)


def build_cache(items: Sequence[DatasetItem], image_encoder: ImageEncoder | None, text_encoder: TextEncoder | None,
                cache_dir: Path, progress: Progress | None = None, empty_caption: bool = False) -> LatentCache:
    """Encode what is not cached yet (each unique latent and caption once) and return the cache.

    An encoder may be None when everything it would encode is cached already; otherwise a
    :class:`TrainerInputError` says what is missing before anything is encoded. ``empty_caption`` also caches
    the empty caption, which caption dropout trains with. Items with a mask get their loss weights cached at
    latent resolution.
    """
    items = list(items)
    if not items:
        raise TrainerInputError("dataset: there are no images to cache. Add images to the dataset folder.")
    root = ensure_writable_dir(Path(cache_dir), "cache folder")
    latent_dir, text_dir = root / "latents", root / "text"
    latent_dir.mkdir(exist_ok=True)
    text_dir.mkdir(exist_ok=True)
    mask_files = _cache_masks(items, root / "masks")

    latent_keys = [latent_key(item) for item in items]
    text_keys = [text_key(item.caption) for item in items]
    by_latent: dict[str, DatasetItem] = {}
    for key, item in zip(latent_keys, items):
        by_latent.setdefault(key, item)  # identical items (e.g. duplicate files) share one latent
    by_text = {key: item.caption for key, item in zip(text_keys, items)}
    if empty_caption:
        by_text.setdefault(text_key(""), "")
    latents = _plan(latent_dir, {k: _latent_shape_check(i, image_encoder) for k, i in by_latent.items()},
                    image_encoder)
    texts = _plan(text_dir, {k: _text_shape_check for k in by_text}, text_encoder)
    _require(image_encoder, latents, len(by_latent), latent_dir, "images have", "the VAE (CLI: model.vae)")
    _require(text_encoder, texts, len(by_text), text_dir, "captions have", _TEXT_ENCODERS)

    total = len(by_latent) + len(by_text)
    done = total - len(latents.missing) - len(texts.missing)
    reused = done
    if progress:
        progress(done, total)
    with torch.no_grad():
        for key in latents.missing:
            item = by_latent[key]
            latent = _encode_image(image_encoder, item)
            latents.found[key] = save_safetensors({"latent": latent}, latents.path(key), {
                "format": "flux-lora-trainer-latent/1", "encoder": str(image_encoder.identity),
                "source": Path(str(item.source)).name, "size": f"{item.width}x{item.height}",
                "crop": json.dumps(list(item.crop)), "flip": str(item.flip),
            })
            done += 1
            if progress:
                progress(done, total)
        for n in _encode_captions(text_encoder, texts, by_text):
            done += n
            if progress:
                progress(done, total)
    encoded = total - reused
    log.info("cache %s: %d files reused, %d encoded (%d latents, %d captions)",
             root, reused, encoded, len(by_latent), len(by_text))
    return LatentCache(items, [latents.found[k] for k in latent_keys], [texts.found[k] for k in text_keys],
                       reused, encoded, mask_files)


def build_prompt_cache(prompts: Sequence[str], text_encoder: TextEncoder | None,
                       cache_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden [L, D], pooled [P]) per prompt, e.g. validation prompts, sharing the captions' text cache."""
    prompts = list(prompts)
    if not prompts:
        return []
    text_dir = ensure_writable_dir(Path(cache_dir), "cache folder") / "text"
    text_dir.mkdir(exist_ok=True)
    keys = [text_key(p) for p in prompts]
    by_text = dict(zip(keys, prompts))
    texts = _plan(text_dir, {k: _text_shape_check for k in by_text}, text_encoder)
    _require(text_encoder, texts, len(by_text), text_dir, "prompts have", _TEXT_ENCODERS)
    with torch.no_grad():
        for _ in _encode_captions(text_encoder, texts, by_text):
            pass
    out = []
    for key in keys:
        tensors = _load(texts.found[key])
        out.append((tensors["hidden"], tensors["pooled"]))
    return out


def mask_key(item: DatasetItem) -> str:
    return _digest("mask", PREPROCESS_VERSION, item.mask_hash, item.width, item.height, list(item.crop),
                   item.flip)[:32]


def _cache_masks(items: Sequence[DatasetItem], folder: Path) -> list[Path | None]:
    """Each item's mask averaged over 8×8 pixel cells (one latent cell each); no encoder needed."""
    out: list[Path | None] = []
    for item in items:
        if item.mask is None:
            out.append(None)
            continue
        folder.mkdir(exist_ok=True)
        path = folder / f"{mask_key(item)}{_SUFFIX}"
        expected = [1, item.height // 8, item.width // 8]
        if not (path.is_file() and _valid(path, lambda shapes: shapes.get("mask") == expected)):
            weights = torch.nn.functional.avg_pool2d(item.load_mask()[None], 8)[0]
            save_safetensors({"mask": weights.contiguous()}, path, {"format": "flux-lora-trainer-mask/1",
                                                                    "source": Path(str(item.mask)).name})
        out.append(path)
    if any(p is not None for p in out):
        log.info("cache: %d of %d items have a loss mask", sum(p is not None for p in out), len(out))
    return out


def latent_key(item: DatasetItem) -> str:
    return _digest("latent", PREPROCESS_VERSION, item.content_hash, item.width, item.height, list(item.crop),
                   item.flip)[:32]


def text_key(caption: str) -> str:
    return _digest("text", caption)[:32]


def encoder_key(identity: str) -> str:
    return _digest("encoder", str(identity))[:16]


# ---------------------------------------------------------------------------------------------------------------


class _Plan:
    """Which entries of one cache folder are present and valid for one encoder, and which must be encoded."""

    def __init__(self, folder: Path, enc_key: str | None):
        self.folder = folder
        self.encoder_key = enc_key
        self.found: dict[str, Path] = {}
        self.missing: list[str] = []

    def path(self, key: str) -> Path:
        return self.folder / f"{key}-{self.encoder_key}{_SUFFIX}"


def _plan(folder: Path, checks: dict[str, Callable[[dict[str, list[int]]], bool]], encoder) -> _Plan:
    if encoder is not None:
        plan = _Plan(folder, encoder_key(encoder.identity))
    else:
        plan = _Plan(folder, _common_encoder_key(folder, list(checks)))
    for key, check in checks.items():
        path = plan.path(key)
        if plan.encoder_key is not None and path.is_file() and _valid(path, check):
            plan.found[key] = path
        else:
            plan.missing.append(key)
    return plan


def _common_encoder_key(folder: Path, keys: list[str]) -> str | None:
    """Without an encoder: the encoder key cached for every entry (None if there is none)."""
    present: dict[str, set[str]] = {}
    for path in folder.glob(f"*{_SUFFIX}"):
        key, _, enc = path.name[: -len(_SUFFIX)].partition("-")
        present.setdefault(key, set()).add(enc)
    common = set.intersection(*(present.get(k, set()) for k in keys))
    if len(common) > 1:
        raise TrainerInputError(
            f"cache folder '{folder}' holds entries from {len(common)} different encoders for this data, so without "
            f"the encoder it is unclear which to use. Connect the encoder you trained with."
        )
    return common.pop() if common else None


def _require(encoder, plan: _Plan, total: int, folder: Path, what: str, fix: str) -> None:
    if plan.missing and encoder is None:
        raise TrainerInputError(
            f"cache: {len(plan.missing)} of {total} {what} no cached entry in '{folder}' and no encoder was given. "
            f"Connect {fix} so they are encoded once; later runs can go without it."
        )


def _valid(path: Path, check: Callable[[dict[str, list[int]]], bool]) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        log.warning("cache file %s is damaged (%s); encoding it again", path, exc)
        return False
    if not check(shapes):
        log.warning("cache file %s holds unexpected tensors %s; encoding it again", path, shapes)
        return False
    return True


def _latent_layout(encoder) -> tuple[int, int]:
    """(channels, pixels per latent cell) of the encoder's model-space latents; FLUX.1's unless it says otherwise."""
    return getattr(encoder, "latent_channels", 16), getattr(encoder, "latent_downscale", 8)


def _latent_shape_check(item: DatasetItem, encoder):
    """Without an encoder, a latent of either family's layout is taken (the encoder key says whose it is)."""
    layouts = [_latent_layout(encoder)] if encoder is not None else [(16, 8), (128, 16)]
    expected = [[c, item.height // d, item.width // d] for c, d in layouts]
    return lambda shapes: shapes.get("latent") in expected


def _text_shape_check(shapes: dict[str, list[int]]) -> bool:
    return len(shapes.get("hidden", [])) == 2 and len(shapes.get("pooled", [])) == 1


def _encode_image(encoder, item: DatasetItem) -> torch.Tensor:
    latents = encoder.encode(item.load_pixels()[None])
    channels, downscale = _latent_layout(encoder)
    expected = [1, channels, item.height // downscale, item.width // downscale]
    if not torch.is_tensor(latents) or list(latents.shape) != expected:
        got = list(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise TrainerInputError(
            f"image encoder: returned {got} for the {item.width}×{item.height} image '{item.source}', expected "
            f"{expected}. Use the VAE of the model being trained (FLUX.1: 16 latent channels at /8; FLUX.2: "
            f"128 at /16)."
        )
    return _storable(latents[0], "image encoder", f"image '{item.source}'")


def _encode_captions(encoder, plan: _Plan, captions: dict[str, str]):
    """Encode the plan's missing captions in batches; yields how many were written after each batch."""
    for start in range(0, len(plan.missing), TEXT_BATCH):
        keys = plan.missing[start:start + TEXT_BATCH]
        batch = [captions[k] for k in keys]
        hidden, pooled = encoder.encode(batch)
        if hidden.ndim != 3 or pooled.ndim != 2 or hidden.shape[0] != len(batch) or pooled.shape[0] != len(batch):
            raise TrainerInputError(
                f"text encoder: returned hidden {list(hidden.shape)} and pooled {list(pooled.shape)} for "
                f"{len(batch)} captions, expected [B, L, D] and [B, P]. Use the FLUX.1 CLIP-L and T5 encoders."
            )
        for i, key in enumerate(keys):
            what = f"caption '{batch[i]}'"
            tensors = {"hidden": _storable(hidden[i], "text encoder", what),
                       "pooled": _storable(pooled[i], "text encoder", what)}
            plan.found[key] = save_safetensors(tensors, plan.path(key), {
                "format": "flux-lora-trainer-text/1", "encoder": str(encoder.identity), "caption": batch[i],
            })
        yield len(keys)


def _storable(tensor: torch.Tensor, what: str, name: str) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if tensor.dtype not in _STORED_DTYPES:
        tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise TrainerInputError(
            f"{what}: produced NaN or infinite values for {name}. Run the encoder in bf16 or fp32 "
            f"(T5 overflows in fp16)."
        )
    return tensor.clone()  # its own storage: a slice of a batch would otherwise keep the whole batch alive


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise TrainerInputError(
            f"cache file '{path}' is missing or damaged ({exc}). Run the cache step again to re-encode it."
        ) from exc


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
