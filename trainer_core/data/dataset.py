"""Dataset: images + captions → training items (bucket size, crop, flip), and the batch order.

An item is fully decided at scan time — caption, bucket, crop box, flip — so that the latent cache can
key it by content and a resumed run sees exactly the same data. Pixels are only decoded when the cache
encodes an item (:meth:`DatasetItem.load_pixels`).

Buckets are area-preserving: for a resolution R an image gets the (w, h) with w·h ≤ R², sides multiples
of 16 px (FLUX packs 2×2 patches of an 8× VAE latent) and the aspect ratio closest to the image's,
between 1:2 and 2:1. Bucket sides step in R/16 (at least 16 px) so a dataset falls into few bucket
sizes and batches of one size fill up.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import IMAGE_EXTENSIONS, DatasetConfig
from ..errors import TrainerInputError

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).parent / "samples"  # bundled demo images with captions
MAX_ASPECT = 2.0  # wider/taller images are cropped to a 2:1 bucket
# 16-bit grey as Pillow opens it (16-bit PNGs open as "I" in older Pillow versions, "I;16" in newer ones).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class DatasetItem:
    """One training example: an image at one bucket size, with its caption, crop and flip decided."""

    source: Path | str  # image file, or an id such as "image 3" for in-memory images
    caption: str  # final caption, trigger word included
    width: int  # bucket size in px, multiples of 16
    height: int
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) in source pixels (after EXIF rotation)
    flip: bool
    content_hash: str  # sha256 of the image file bytes (or of the in-memory pixels)
    repeats: int = 1
    image: Image.Image | None = field(default=None, repr=False, compare=False)  # in-memory source only
    mask: Path | str | None = None  # loss-weight mask (dataset.masked_loss): a grey-scale image file or an id
    mask_hash: str = ""  # sha256 of the mask file bytes (or of the in-memory mask)
    mask_image: Image.Image | None = field(default=None, repr=False, compare=False)  # in-memory mask only
    # Paired edit datasets (dataset.control_folder): the images the edit starts from, placed on this item's bucket
    # (items themselves, without caption or controls; see data/pairs.py).
    controls: tuple["DatasetItem", ...] = ()

    def load_pixels(self) -> torch.Tensor:
        """[3, height, width] float in 0..1: the crop box resized to the bucket (one resample), then flipped."""
        img = self.image if self.image is not None else self._read_file()
        return _to_tensor(self._place(img))

    def load_mask(self) -> torch.Tensor | None:
        """[1, height, width] loss weights in 0..1 (white = 1), cropped, resized and flipped like the image."""
        if self.mask is None:
            return None
        img = self.mask_image
        if img is None:
            data = _read_bytes(Path(self.mask))
            if hashlib.sha256(data).hexdigest() != self.mask_hash:
                raise TrainerInputError(f"mask '{self.mask}' changed since the dataset was scanned. Scan the dataset "
                                        f"again (re-run the dataset step).")
            img = _decode(data, f"mask '{self.mask}'", mode="L")
        return _to_tensor(self._place(img))

    def _place(self, img: Image.Image) -> Image.Image:
        img = img.resize((self.width, self.height), Image.Resampling.LANCZOS, box=self.crop, reducing_gap=3.0)
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else img

    def _read_file(self) -> Image.Image:
        data = _read_bytes(Path(self.source))
        if hashlib.sha256(data).hexdigest() != self.content_hash:
            # The cache keys latents by the hash taken at scan time; encoding new pixels under it would be wrong.
            raise TrainerInputError(
                f"dataset image '{self.source}' changed since the dataset was scanned. Scan the dataset again "
                f"(re-run the dataset step) so the new image is cached under its new content."
            )
        return _decode(data, f"dataset image '{self.source}'")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).float() / 255.0
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def scan_dataset(cfg: DatasetConfig, allowed_roots: Sequence[Path] | None = None) -> list[DatasetItem]:
    """Items for every supported image in ``cfg.folder``: one per (image, resolution), plus a flipped twin
    when ``cfg.flip``. Files are taken in name order, so the item order is stable.

    ``allowed_roots``: folders that the dataset folder and every file read (images, captions, masks) must lie
    in once symbolic links are resolved (a server's policy); None reads wherever the links lead.
    """
    cfg.validate()
    folder = _check_folder(cfg.folder)
    roots = None if allowed_roots is None else [Path(r).resolve() for r in allowed_roots]
    _check_inside(folder, roots, "dataset.folder")
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name.lower()
    )
    if not files:
        raise TrainerInputError(
            f"dataset.folder: '{folder}' is empty. Put your training images ({_extensions()}) in it, each with a "
            f"same-name {_caption_ext(cfg)} caption file."
        )
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    masks: dict[Path, Path] = {}
    if cfg.masked_loss:
        masks, images = _pair_masks(images, cfg.mask_suffix)
    if not images:
        found = Counter(p.suffix.lower() or "(no extension)" for p in files)
        listing = ", ".join(f"{n} × {ext}" for ext, n in sorted(found.items()))
        raise TrainerInputError(
            f"dataset.folder: '{folder}' has no supported images (supported: {_extensions()}; found: {listing}). "
            f"Convert the images to PNG or JPEG, or point dataset.folder at the folder that holds them."
        )
    items: list[DatasetItem] = []
    for path in images:
        _check_inside(path, roots, "dataset image")
        data = _read_bytes(path)
        size = _decode(data, f"dataset image '{path}'").size
        caption = with_trigger(_caption_for(path, cfg, roots), cfg.trigger_word)
        mask = _mask_for(path, size, masks.get(path), roots)
        items += _items_for(path, size, hashlib.sha256(data).hexdigest(), caption, cfg, f"dataset image '{path}'",
                            mask=mask)
    log.info("dataset: %d images → %d items from %s", len(images), len(items), folder)
    if cfg.control_folder:
        from .pairs import attach_controls

        items = attach_controls(items, cfg, roots)
    return items


def dataset_from_images(images: torch.Tensor, captions: Sequence[str], cfg: DatasetConfig,
                        masks: torch.Tensor | None = None) -> list[DatasetItem]:
    """Items from a ComfyUI IMAGE batch [B, H, W, C] in 0..1. ``captions``: one per image, one for all,
    or none (then each caption is the trigger word alone). ``cfg.folder`` is not used. ``masks``: loss
    weights [B, H, W] (or [H, W] for all) in 0..1, used when ``cfg.masked_loss``."""
    cfg.validate()
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise TrainerInputError(
            f"images: expected an IMAGE batch [B, H, W, 3], got shape {list(images.shape)}. Connect an image output."
        )
    count = images.shape[0]
    captions = list(captions)
    if len(captions) not in (0, 1, count):
        raise TrainerInputError(
            f"captions: got {len(captions)} captions for {count} images. Give one caption per image "
            f"(one per line), a single caption for all, or none to use the trigger word alone."
        )
    if len(captions) <= 1:
        captions = (captions or [""]) * count
    pixels = (images[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    mask_pixels = _mask_batch(masks, images.shape[:3]) if cfg.masked_loss and masks is not None else None
    items: list[DatasetItem] = []
    for i in range(count):
        img = Image.fromarray(pixels[i], "RGB")
        digest = hashlib.sha256(repr(pixels[i].shape).encode() + pixels[i].tobytes()).hexdigest()
        caption = with_trigger(" ".join(captions[i].split()), cfg.trigger_word)
        label = f"image {i + 1} of the batch"
        mask = None
        if mask_pixels is not None:
            m = mask_pixels[i]
            mask = (f"mask {i + 1}", hashlib.sha256(repr(m.shape).encode() + m.tobytes()).hexdigest(),
                    Image.fromarray(m, "L"))
        items += _items_for(f"image {i + 1}", img.size, digest, caption, cfg, label, image=img, mask=mask)
    return items


def _mask_batch(masks: torch.Tensor, shape) -> np.ndarray:
    count, height, width = shape
    if masks.ndim == 2:
        masks = masks[None].expand(count, -1, -1)
    if masks.ndim != 3 or masks.shape[0] not in (1, count) or tuple(masks.shape[1:]) != (height, width):
        raise TrainerInputError(
            f"masks: expected a MASK batch [{count}, {height}, {width}] matching the images, got {list(masks.shape)}. "
            f"Give one mask per image at the images' size."
        )
    masks = masks.expand(count, -1, -1)
    return (masks.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def caption_variant(caption: str, rng: random.Random, dropout: float = 0.0, shuffle: bool = False,
                    keep: int = 1) -> str:
    """The caption one training sample sees: empty with probability ``dropout``; else, with ``shuffle``, its
    comma-separated tags shuffled after the first ``keep`` (which keep their place, e.g. the trigger word)."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def with_trigger(caption: str, trigger: str) -> str:
    """``"trigger, caption"``, unless the caption already names the trigger word."""
    trigger = trigger.strip()
    if not trigger or trigger in caption.replace(",", " ").split():
        return caption
    return f"{trigger}, {caption}" if caption else trigger


@functools.lru_cache(maxsize=None)
def bucket_sizes(resolution: int) -> tuple[tuple[int, int], ...]:
    """All (w, h) buckets for ``resolution``: w·h ≤ resolution², sides multiples of 16, aspect ≤ 2:1."""
    step = max(16, resolution // 256 * 16)
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for w in range(step, int(resolution * math.sqrt(MAX_ASPECT)) + step + 1, step):
        h = area // w // step * step
        if h >= 16 and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
            sizes |= {(w, h), (h, w)}
    return tuple(sorted(sizes))


def choose_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (larger area on a tie)."""
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


class BatchOrder:
    """Which items each micro-batch holds, as a pure function of the step index.

    Every batch holds items of one bucket size. Each epoch holds every item ``repeats`` times (an int, or one
    per item), shuffled from ``seed`` and the epoch number, so a resumed run needs only the step index.
    A size group's last batch is topped up from the start of that group, so every batch has exactly
    ``batch_size`` items and memory per step stays constant.
    ``items``: DatasetItems, or their (width, height) sizes such as ``LatentCache.sizes``.

    With ``processes`` > 1 (data-parallel training) a batch is the global batch of ``batch_size × processes``
    items, formed exactly as one process with that batch size would form it, and process ``r`` trains on
    ``batch[shard(r)]``: every process takes the same number of steps, all on one bucket size, and N processes
    see the data of one process with the global batch.
    """

    def __init__(self, items: Sequence, batch_size: int, repeats: int | Sequence[int] = 1, seed: int = 0,
                 processes: int = 1):
        sizes = [(x.width, x.height) if isinstance(x, DatasetItem) else tuple(x) for x in items]
        if not sizes:
            raise TrainerInputError("dataset: there are no items to train on. Add images to the dataset folder.")
        if batch_size < 1:
            raise TrainerInputError(f"train.batch_size: must be at least 1, got {batch_size}.")
        counts = [repeats] * len(sizes) if isinstance(repeats, int) else list(repeats)
        if len(counts) != len(sizes) or min(counts) < 1:
            raise TrainerInputError(f"dataset.repeats: must be at least 1 for every item, got {repeats}.")
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (size, count) in enumerate(zip(sizes, counts)):
            groups.setdefault(size, []).extend([index] * count)
        self._groups = [groups[size] for size in sorted(groups)]
        self.per_process = batch_size
        self.batch_size = batch_size * processes
        self.seed = seed
        self.batches_per_epoch = sum(math.ceil(len(g) / self.batch_size) for g in self._groups)
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    def epoch(self, step_index: int) -> int:
        return step_index // self.batches_per_epoch

    def batch(self, step_index: int) -> list[int]:
        epoch, position = divmod(step_index, self.batches_per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._epoch_batches(epoch), epoch
        return list(self._batches[position])

    def shard(self, rank: int) -> slice:
        """The positions in each batch that process ``rank`` trains on."""
        return slice(rank * self.per_process, (rank + 1) * self.per_process)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"batch-order:{self.seed}:{epoch}")
        size = self.batch_size
        batches = []
        for group in self._groups:
            order = list(group)
            rng.shuffle(order)
            count = math.ceil(len(order) / size)
            padded = [order[j % len(order)] for j in range(count * size)]
            batches += [padded[j * size:(j + 1) * size] for j in range(count)]
        rng.shuffle(batches)
        return batches


def dataset_fingerprint(items: Sequence[DatasetItem]) -> str:
    """A short hash of what the model trains on (pixels, captions, sizes, crops, flips, repeats, order);
    file names and folders do not count, so moving the dataset keeps it."""
    rows = [[i.content_hash, i.caption, i.width, i.height, list(i.crop), i.flip, i.repeats]
            + ([i.mask_hash] if i.mask is not None else [])
            + ([[c.content_hash, list(c.crop)] for c in i.controls] if i.controls else []) for i in items]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------


def _items_for(source, size: tuple[int, int], digest: str, caption: str, cfg: DatasetConfig, label: str,
               image: Image.Image | None = None, mask: tuple | None = None) -> list[DatasetItem]:
    """``mask``: (path or id, content hash, in-memory image or None), or None for no mask."""
    width, height = size
    resolutions = sorted(set(cfg.resolutions))
    items = []
    for n, res in enumerate(resolutions):
        bw, bh = choose_bucket(width, height, res) if cfg.buckets else (res, res)
        # Seeded by content, not position, so adding a file does not move the other images' crops.
        rng = random.Random(f"crop:{cfg.seed}:{digest}:{bw}x{bh}")
        crop = _crop_box(width, height, bw, bh, cfg.crop, rng)
        if (crop[2] - crop[0] < bw or crop[3] - crop[1] < bh) and not cfg.allow_upscale:
            if n == 0:
                raise TrainerInputError(
                    f"{label} is {width}×{height} px, too small for its {bw}×{bh} bucket at resolution {res} "
                    f"(the smallest in dataset.resolutions) and would need upscaling. Use a larger image or remove "
                    f"it{_lower_resolution_hint(width, height, res, cfg)}, or set dataset.allow_upscale = true."
                )
            log.warning("%s (%d×%d px) is too small for resolution %d (bucket %d×%d); skipped at that resolution",
                        label, width, height, res, bw, bh)
            continue
        for flip in (False, True) if cfg.flip else (False,):
            items.append(DatasetItem(source, caption, bw, bh, crop, flip, digest, cfg.repeats, image, *(mask or ())))
    return items


def _crop_box(width: int, height: int, bw: int, bh: int, mode: str, rng: random.Random) -> tuple[int, int, int, int]:
    """The largest region of the bucket's aspect ratio inside the image, centred or at a seeded random spot."""
    if width * bh > height * bw:  # image wider than the bucket
        cw, ch = min(width, round(height * bw / bh)), height
    else:
        cw, ch = width, min(height, round(width * bh / bw))
    if mode == "random":
        left, top = rng.randint(0, width - cw), rng.randint(0, height - ch)
    else:
        left, top = (width - cw) // 2, (height - ch) // 2
    return (left, top, left + cw, top + ch)


def _lower_resolution_hint(width: int, height: int, res: int, cfg: DatasetConfig) -> str:
    for lower in range(res - 16, 15, -16):
        bw, bh = choose_bucket(width, height, lower) if cfg.buckets else (lower, lower)
        left, top, right, bottom = _crop_box(width, height, bw, bh, "center", random.Random(0))
        if right - left >= bw and bottom - top >= bh:
            return f", lower dataset.resolutions (this image fits {lower})"
    return ""


def _check_folder(folder: str) -> Path:
    if not str(folder).strip():
        raise TrainerInputError("dataset.folder: no folder given. Set it to a folder of images with .txt captions.")
    path = Path(folder).expanduser()
    if not path.exists():
        raise TrainerInputError(f"dataset.folder: '{path}' does not exist. Check the path (absolute paths are safest).")
    if not path.is_dir():
        raise TrainerInputError(f"dataset.folder: '{path}' is a file, not a folder. Give the folder with the images.")
    return path


def _check_inside(path: Path, roots: list[Path] | None, label: str) -> None:
    if roots is not None and not any(path.resolve().is_relative_to(root) for root in roots):
        raise TrainerInputError(
            f"{label} '{path}' is a link that leads outside the folders this server lets nodes read. Put the file "
            f"itself in the dataset folder instead of a link to it."
        )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TrainerInputError(
            f"dataset image '{path}' cannot be read ({exc.strerror or exc}). Check that it exists and is readable."
        ) from exc


def _pair_masks(images: list[Path], suffix: str) -> tuple[dict[Path, Path], list[Path]]:
    """Split ``<stem><suffix>.<ext>`` mask files from the training images: ({image: mask}, images)."""
    suffix = suffix.strip().lower()
    is_mask = [p for p in images if p.stem.lower().endswith(suffix)]
    training = [p for p in images if p not in is_mask]
    by_stem = {p.stem.lower(): p for p in training}
    pairs = {}
    for mask in is_mask:
        image = by_stem.get(mask.stem.lower()[: -len(suffix)])
        if image is None:
            log.warning("mask %s has no image of the same name; ignored", mask)
        else:
            pairs[image] = mask
    without = len(training) - len(pairs)
    if without:
        log.info("masked loss: %d of %d images have no %s mask and train on every pixel", without, len(training),
                 suffix)
    return pairs, training


def _mask_for(image: Path, size: tuple[int, int], mask: Path | None, roots: list[Path] | None) -> tuple | None:
    if mask is None:
        return None
    _check_inside(mask, roots, "mask")
    data = _read_bytes(mask)
    mask_size = _decode(data, f"mask '{mask}'", mode="L").size
    if mask_size != size:
        raise TrainerInputError(
            f"mask '{mask}' is {mask_size[0]}×{mask_size[1]} px but its image '{image.name}' is {size[0]}×{size[1]}. "
            f"Save the mask at the image's size (white = train, black = ignore)."
        )
    return mask, hashlib.sha256(data).hexdigest(), None


def _decode(data: bytes, label: str, mode: str = "RGB") -> Image.Image:
    """Decode fully (so truncated files fail here, not mid-training), apply EXIF rotation, flatten to RGB."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise TrainerInputError(
            f"{label} is corrupt or not an image ({exc}). Re-export it as PNG or JPEG, or remove it from the folder."
        ) from exc
    if img.mode in _SIXTEEN_BIT_MODES:
        # convert() would clip 16-bit grey at 255 (a nearly white image): scale the full range to 8 bits instead.
        grey = np.asarray(img).astype(np.float64) * (255 / 65535)
        img = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
    if mode == "L":  # a mask: grey levels are loss weights
        return img.convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas become white rather than whatever colour happens to sit under alpha 0.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _caption_for(image: Path, cfg: DatasetConfig, roots: list[Path] | None) -> str:
    path = image.with_suffix(_caption_ext(cfg))
    if not path.is_file():
        if cfg.caption_fallback == "stem":
            return image.stem.replace("_", " ").strip()
        return ""
    _check_inside(path, roots, "caption file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TrainerInputError(
            f"caption file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}). "
            f"Re-save it as UTF-8 in a text editor."
        ) from exc
    except OSError as exc:
        raise TrainerInputError(
            f"caption file '{path}' cannot be read ({exc.strerror or exc}). Check its permissions, or delete it "
            f"to use dataset.caption_fallback."
        ) from exc
    return " ".join(text.split())


def _caption_ext(cfg: DatasetConfig) -> str:
    ext = cfg.caption_extension.strip() or ".txt"
    return ext if ext.startswith(".") else f".{ext}"


def _extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS)
