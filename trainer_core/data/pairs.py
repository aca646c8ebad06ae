"""Paired edit datasets (FLUX.1 Kontext, FLUX.2 reference images): each target image has one or more controls.

A target folder holds the edited images with their captions (the edit instruction); a control folder holds the
images the edit starts from, under the same file stems: ``name.png`` for one control, or ``name_0.png``,
``name_1.png`` … for several. Every target needs the same number of controls (a batch stacks them).

A control is placed on its target's bucket: the largest region of the bucket's aspect ratio, centred where the
target's crop is centred (so a random crop cuts the same part of both), resized to the bucket and flipped with it.
It is a :class:`DatasetItem` itself, so the cache keys its latent by content like any image and reuses it across runs.
A control whose aspect ratio falls into another bucket than its target's would need more than a crop to line up,
and is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config import IMAGE_EXTENSIONS, DatasetConfig
from ..errors import TrainerInputError
from . import dataset as ds
from .dataset import DatasetItem

log = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^(?P<stem>.+)_(?P<index>\d+)$")


def attach_controls(items: Sequence[DatasetItem], cfg: DatasetConfig,
                    roots: list[Path] | None = None) -> list[DatasetItem]:
    """``items`` (scanned from the target folder) with their controls from ``cfg.control_folder``."""
    folder = _check_control_folder(cfg.control_folder, cfg.folder)
    ds._check_inside(folder, roots, "dataset.control_folder")
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name.lower())
    targets = {Path(str(item.source)).stem.lower(): Path(str(item.source)) for item in items}
    controls = _match(files, targets)
    counts = {stem: len(found) for stem, found in controls.items()}
    first = min(targets)
    for stem, target in sorted(targets.items()):
        if stem not in controls:
            raise TrainerInputError(
                f"dataset: target image '{target}' has no control image in '{folder}'. Add its control as "
                f"'{target.stem}.png' (or '{target.stem}_0.png', '{target.stem}_1.png' … for several), or remove "
                f"the target.")
        if counts[stem] != counts[first]:
            raise TrainerInputError(
                f"dataset: target image '{target}' has {counts[stem]} control image(s) but '{targets[first]}' has "
                f"{counts[first]}; every target needs the same number of controls (a batch stacks them). Give each "
                f"target the same number of controls.")
    loaded: dict[Path, tuple[str, tuple[int, int]]] = {}
    for found in controls.values():
        for path in found:
            ds._check_inside(path, roots, "control image")
            data = ds._read_bytes(path)
            loaded[path] = (hashlib.sha256(data).hexdigest(), ds._decode(data, f"control image '{path}'").size)
    out = []
    for item in items:
        paths = controls[Path(str(item.source)).stem.lower()]
        out.append(dataclasses.replace(item, controls=tuple(
            _place_control(item, path, *loaded[path], cfg, f"control image '{path}'") for path in paths)))
    log.info("dataset: %d targets paired with %d control image(s) each from %s", len(targets), counts[first], folder)
    return out


def controls_from_images(items: Sequence[DatasetItem], controls: torch.Tensor, cfg: DatasetConfig
                         ) -> list[DatasetItem]:
    """``items`` from an IMAGE batch (``dataset_from_images``) with one control each from a second IMAGE batch
    ``controls`` [B, H, W, C] in 0..1 (image i is the control of target i)."""
    count = len({item.source for item in items})
    if controls.ndim != 4 or controls.shape[-1] not in (3, 4) or controls.shape[0] != count:
        raise TrainerInputError(
            f"controls: expected an IMAGE batch [{count}, H, W, 3] (one control per target image), got shape "
            f"{list(controls.shape)}. Connect as many control images as target images, in the same order.")
    pixels = (controls[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    placed: dict[str, tuple[Image.Image, str]] = {}
    for i in range(count):
        image = Image.fromarray(pixels[i], "RGB")
        placed[f"image {i + 1}"] = (image, hashlib.sha256(repr(pixels[i].shape).encode() + pixels[i].tobytes())
                                    .hexdigest())
    out = []
    for item in items:
        image, digest = placed[str(item.source)]
        source = f"control {str(item.source).split()[-1]}"
        out.append(dataclasses.replace(item, controls=(
            _place_control(item, source, digest, image.size, cfg, f"control {source.split()[-1]} of the batch",
                           image=image),)))
    return out


def _check_control_folder(control: str, target: str) -> Path:
    path = Path(control).expanduser()
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise TrainerInputError(f"dataset.control_folder: '{path}' {state}. Give the folder of control images "
                                f"(the images before the edit), named like their targets.")
    if path.resolve() == Path(target).expanduser().resolve():
        raise TrainerInputError("dataset.control_folder: it is the target folder itself. Keep the control images "
                                "(before the edit) in a folder of their own, named like their targets.")
    return path


def _match(files: list[Path], targets: dict[str, Path]) -> dict[str, list[Path]]:
    """{target stem: its control files in index order}; a control without a target, a target with both ``name``
    and ``name_N`` controls, or numbered controls with a gap raise."""
    single: dict[str, Path] = {}
    numbered: dict[str, dict[int, Path]] = {}
    for path in files:
        stem = path.stem.lower()
        match = _NUMBERED.match(stem)
        if stem in targets:
            single[stem] = path
        elif match and match["stem"] in targets:
            numbered.setdefault(match["stem"], {})[int(match["index"])] = path
        else:
            raise TrainerInputError(
                f"dataset: control image '{path}' has no target image of the same name in the target folder. Name "
                f"it after its target ('<target>.png', or '<target>_0.png', '<target>_1.png' … for several), add "
                f"its target, or remove it.")
    out: dict[str, list[Path]] = {stem: [path] for stem, path in single.items()}
    for stem, by_index in numbered.items():
        if stem in single:
            raise TrainerInputError(
                f"dataset: target image '{targets[stem]}' has both '{single[stem].name}' and numbered controls "
                f"('{by_index[min(by_index)].name}'). Number every control of a target (_0, _1 …) or give just one.")
        missing = sorted(set(range(len(by_index))) - set(by_index))
        if missing:
            raise TrainerInputError(
                f"dataset: the controls of target image '{targets[stem]}' skip number {missing[0]} "
                f"({', '.join(p.name for _, p in sorted(by_index.items()))}). Number them _0, _1 … without gaps.")
        out[stem] = [by_index[i] for i in sorted(by_index)]
    return out


def _place_control(item: DatasetItem, source, digest: str, size: tuple[int, int], cfg: DatasetConfig, label: str,
                   image: Image.Image | None = None) -> DatasetItem:
    width, height = size
    resolution = _resolution_of(item, cfg)
    if cfg.buckets and ds.choose_bucket(width, height, resolution) != (item.width, item.height):
        bw, bh = ds.choose_bucket(width, height, resolution)
        raise TrainerInputError(
            f"{label} is {width}×{height} px, an aspect ratio that falls into the {bw}×{bh} bucket at resolution "
            f"{resolution}, but its target '{item.source}' trains at {item.width}×{item.height}; a crop cannot line "
            f"the two up. Crop or pad the control to its target's aspect ratio.")
    crop = _crop_like(item, width, height)
    if (crop[2] - crop[0] < item.width or crop[3] - crop[1] < item.height) and not cfg.allow_upscale:
        raise TrainerInputError(
            f"{label} is {width}×{height} px, too small for its target's {item.width}×{item.height} bucket and would "
            f"need upscaling. Use a larger control image, or set dataset.allow_upscale = true.")
    return DatasetItem(source, "", item.width, item.height, crop, item.flip, digest, item.repeats, image)


def _resolution_of(item: DatasetItem, cfg: DatasetConfig) -> int:
    """The resolution of ``cfg.resolutions`` whose buckets hold the item's size."""
    return next((r for r in sorted(set(cfg.resolutions))
                 if (item.width, item.height) in (ds.bucket_sizes(r) if cfg.buckets else ((r, r),))), 0)


def _crop_like(item: DatasetItem, width: int, height: int) -> tuple[int, int, int, int]:
    """The largest region of the bucket's aspect ratio in a ``width`` × ``height`` control, centred where the
    target's crop is centred in the target (same relative position), kept inside the control."""
    bw, bh = item.width, item.height
    if width * bh > height * bw:
        cw, ch = min(width, round(height * bw / bh)), height
    else:
        cw, ch = width, min(height, round(width * bh / bw))
    left, top, right, bottom = item.crop
    source_w, source_h = _source_size(item)
    cx, cy = (left + right) / 2 / source_w * width, (top + bottom) / 2 / source_h * height
    x = int(np.clip(round(cx - cw / 2), 0, width - cw))
    y = int(np.clip(round(cy - ch / 2), 0, height - ch))
    return (x, y, x + cw, y + ch)


def _source_size(item: DatasetItem) -> tuple[int, int]:
    if item.image is not None:
        return item.image.size
    with Image.open(item.source) as img:  # the header only; EXIF rotation as the dataset applies it
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
