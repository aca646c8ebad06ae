"""Dataset scanning: captions, buckets, crops, flips, batch order, and the errors a user sees for bad input."""

import logging
import shutil
from collections import Counter

import pytest
import torch
from PIL import Image

from trainer_core.config import DatasetConfig
from trainer_core.data.dataset import (
    SAMPLES_DIR,
    BatchOrder,
    bucket_sizes,
    choose_bucket,
    dataset_fingerprint,
    dataset_from_images,
    scan_dataset,
)
from trainer_core.errors import TrainerInputError

RED, BLUE, BLACK = (255, 0, 0), (0, 0, 255), (0, 0, 0)


def make_image(path, size=(32, 32), colour=RED, fmt=None):
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def cfg(folder, **kw):
    kw.setdefault("resolutions", [32])
    return DatasetConfig(folder=str(folder), **kw)


def test_captions_come_from_txt_files_with_trigger_and_fallbacks(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red\n  cube ", encoding="utf-8")
    make_image(tmp_path / "b_photo.png")  # no caption file
    make_image(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("\ufeffzxq standing", encoding="utf-8")  # BOM, already names the trigger

    items = scan_dataset(cfg(tmp_path, trigger_word="zxq"))
    assert [i.caption for i in items] == ["zxq, a red cube", "zxq, b photo", "zxq standing"]
    items = scan_dataset(cfg(tmp_path, trigger_word="zxq", caption_fallback="trigger"))
    assert [i.caption for i in items] == ["zxq, a red cube", "zxq", "zxq standing"]
    items = scan_dataset(cfg(tmp_path))
    assert [i.caption for i in items] == ["a red cube", "b photo", "zxq standing"]


def test_supported_extensions_in_any_case_other_files_ignored(tmp_path):
    make_image(tmp_path / "one.PNG", fmt="PNG")
    make_image(tmp_path / "two.jpeg", fmt="JPEG")
    make_image(tmp_path / "three.webp", fmt="WEBP")
    make_image(tmp_path / ".hidden.png")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "sub").mkdir()
    items = scan_dataset(cfg(tmp_path))
    assert sorted(i.source.name for i in items) == ["one.PNG", "three.webp", "two.jpeg"]


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_buckets_preserve_area_with_sides_multiple_of_16(resolution):
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.9 * resolution**2 <= w * h <= resolution**2
        assert 0.5 <= w / h <= 2.0
    assert choose_bucket(1920, 1080, 1024) == (1344, 768)  # 16:9 → 1.75
    assert choose_bucket(1080, 1920, 1024) == (768, 1344)
    assert choose_bucket(333, 333, resolution) == (resolution, resolution)


def striped(path, size, border):
    """Black borders left and right, red left half and blue right half between them."""
    w, h = size
    img = Image.new("RGB", size, BLACK)
    img.paste(Image.new("RGB", (w // 2 - border, h), RED), (border, 0))
    img.paste(Image.new("RGB", (w - border - w // 2, h), BLUE), (w // 2, 0))
    img.save(path)


def test_wide_image_gets_wide_bucket_center_crop_and_exact_flip(tmp_path):
    striped(tmp_path / "wide.png", (120, 48), border=12)  # 2.5:1, cropped to 2:1 = 96×48 in the middle
    (item,) = scan_dataset(cfg(tmp_path, resolutions=[48]))
    assert (item.width, item.height) == (64, 32)
    assert item.crop == (12, 0, 108, 48)
    pixels = item.load_pixels()
    assert pixels.shape == (3, 32, 64) and pixels.dtype == torch.float32
    assert 0 <= pixels.min() and pixels.max() <= 1
    assert pixels.sum(0).min() > 0.9  # the black borders were cropped away
    assert pixels[0, :, :28].min() > 0.95 and pixels[2, :, 36:].min() > 0.95  # red left, blue right

    plain, flipped = scan_dataset(cfg(tmp_path, resolutions=[48], flip=True))
    assert not plain.flip and flipped.flip and plain.crop == flipped.crop
    assert torch.equal(flipped.load_pixels(), plain.load_pixels().flip(-1))

    (square,) = scan_dataset(cfg(tmp_path, resolutions=[48], buckets=False))
    assert (square.width, square.height) == (48, 48) and square.crop == (36, 0, 84, 48)


def test_random_crop_is_fixed_by_the_seed(tmp_path):
    for k in range(6):
        make_image(tmp_path / f"{k}.png", size=(160, 32), colour=(40 * k, 0, 0))
    first = scan_dataset(cfg(tmp_path, crop="random", buckets=False, seed=1))
    assert first == scan_dataset(cfg(tmp_path, crop="random", buckets=False, seed=1))
    other = scan_dataset(cfg(tmp_path, crop="random", buckets=False, seed=2))
    assert [i.crop for i in first] != [i.crop for i in other]
    assert len({i.crop for i in first}) > 1  # not all centred
    for item in first:
        left, top, right, bottom = item.crop
        assert 0 <= left and right <= 160 and (right - left, bottom - top) == (32, 32)


def test_each_resolution_gives_an_item_too_large_ones_are_skipped(tmp_path, caplog):
    make_image(tmp_path / "a.png", size=(64, 64))
    with caplog.at_level(logging.WARNING):
        items = scan_dataset(cfg(tmp_path, resolutions=[128, 32, 64]))
    assert [(i.width, i.height) for i in items] == [(32, 32), (64, 64)]
    assert "a.png" in caplog.text and "128" in caplog.text


def test_allow_upscale_enlarges_small_images(tmp_path):
    make_image(tmp_path / "small.png", size=(16, 16))
    (item,) = scan_dataset(cfg(tmp_path, allow_upscale=True))
    assert item.load_pixels().shape == (3, 32, 32)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (64, 32), RED)
    exif = img.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° → portrait
    img.save(tmp_path / "phone.jpg", exif=exif)
    (item,) = scan_dataset(cfg(tmp_path, resolutions=[48]))
    assert (item.width, item.height) == (32, 64)
    assert item.load_pixels().shape == (3, 64, 32)


def test_repeats_are_carried_on_the_items(tmp_path):
    make_image(tmp_path / "a.png")
    (item,) = scan_dataset(cfg(tmp_path, repeats=5))
    assert item.repeats == 5


# ---- bad input: each names the file or field and the fix ------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(TrainerInputError, match="does not exist") as err:
        scan_dataset(cfg(tmp_path / "nope"))
    assert "nope" in str(err.value)
    with pytest.raises(TrainerInputError, match="dataset.folder: no folder given"):
        scan_dataset(cfg(""))


def test_empty_folder(tmp_path):
    with pytest.raises(TrainerInputError, match=r"is empty.*\.png.*caption"):
        scan_dataset(cfg(tmp_path))


def test_no_supported_images_says_what_was_found(tmp_path):
    make_image(tmp_path / "a.gif", fmt="GIF")
    make_image(tmp_path / "b.gif", fmt="GIF")
    (tmp_path / "a.txt").write_text("caption")
    with pytest.raises(TrainerInputError) as err:
        scan_dataset(cfg(tmp_path))
    message = str(err.value)
    assert "no supported images" in message and ".png, .jpg, .jpeg, .webp" in message
    assert "2 × .gif" in message and "1 × .txt" in message and "Convert" in message


@pytest.mark.parametrize("content", [b"this is not a png", "truncated"])
def test_corrupt_image(tmp_path, content):
    make_image(tmp_path / "good.png")
    if content == "truncated":
        Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "bad.png")
        content = (tmp_path / "bad.png").read_bytes()[:300]
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(TrainerInputError, match=r"bad\.png' is corrupt.*Re-export it"):
        scan_dataset(cfg(tmp_path))


def test_image_smaller_than_smallest_bucket(tmp_path):
    make_image(tmp_path / "tiny.png", size=(20, 20))
    with pytest.raises(TrainerInputError) as err:
        scan_dataset(cfg(tmp_path, resolutions=[32, 64]))
    message = str(err.value)
    assert "tiny.png" in message and "20×20" in message and "32×32" in message
    assert "this image fits 16" in message and "allow_upscale" in message


def test_caption_file_not_utf8(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(TrainerInputError, match=r"a\.txt' is not UTF-8.*Re-save it as UTF-8"):
        scan_dataset(cfg(tmp_path))


def test_image_changed_after_scan_is_refused(tmp_path):
    make_image(tmp_path / "a.png")
    (item,) = scan_dataset(cfg(tmp_path))
    make_image(tmp_path / "a.png", colour=BLUE)
    with pytest.raises(TrainerInputError, match="changed since the dataset was scanned"):
        item.load_pixels()


# ---- in-memory images (ComfyUI IMAGE batches) -----------------------------------------------------------------


def test_dataset_from_image_batch():
    images = torch.zeros(3, 32, 48, 3)
    images[0, ..., 0] = 1.0  # red
    images[1, ..., 2] = 1.0  # blue
    images[2, ..., 0] = 1.0  # red again: same content, same hash
    config = DatasetConfig(resolutions=[32], trigger_word="zxq")
    items = dataset_from_images(images, ["a  red\nimage", "zxq blue", ""], config)
    assert [i.caption for i in items] == ["zxq, a red image", "zxq blue", "zxq"]
    assert [i.source for i in items] == ["image 1", "image 2", "image 3"]
    assert items[0].content_hash == items[2].content_hash != items[1].content_hash
    pixels = items[1].load_pixels()
    assert pixels.shape == (3, items[1].height, items[1].width)
    assert torch.allclose(pixels[2], torch.ones_like(pixels[2])) and pixels[0].max() == 0

    assert [i.caption for i in dataset_from_images(images, ["one"], config)] == ["zxq, one"] * 3
    with pytest.raises(TrainerInputError, match="got 2 captions for 3 images"):
        dataset_from_images(images, ["a", "b"], config)
    with pytest.raises(TrainerInputError, match="IMAGE batch"):
        dataset_from_images(torch.zeros(32, 32, 3), [], config)


# ---- batch order ----------------------------------------------------------------------------------------------


def sizes(*counts):
    """Item sizes: counts[k] items of size (32, 32 + 16k)."""
    return [(32, 32 + 16 * k) for k, n in enumerate(counts) for _ in range(n)]


def test_batches_hold_one_size_and_every_item_repeats_times_per_epoch():
    item_sizes = sizes(4, 2)
    order = BatchOrder(item_sizes, batch_size=2, repeats=2, seed=0)
    assert order.batches_per_epoch == 6
    for epoch in range(3):
        batches = [order.batch(epoch * 6 + k) for k in range(6)]
        assert all(len({item_sizes[i] for i in b}) == 1 and len(b) == 2 for b in batches)
        assert Counter(i for b in batches for i in b) == {i: 2 for i in range(6)}


def test_batch_order_is_a_function_of_seed_and_step():
    order = BatchOrder(sizes(5, 3), batch_size=2, repeats=1, seed=7)
    run = [order.batch(k) for k in range(40)]
    resumed = BatchOrder(sizes(5, 3), batch_size=2, repeats=1, seed=7)
    assert resumed.batch(23) == run[23]  # resume needs only the step index
    per_epoch = order.batches_per_epoch
    assert run[:per_epoch] != run[per_epoch:2 * per_epoch]  # reshuffled every epoch
    other = BatchOrder(sizes(5, 3), batch_size=2, repeats=1, seed=8)
    assert [other.batch(k) for k in range(40)] != run
    # an odd-sized group is topped up from itself: constant batch size, still one size per batch
    assert all(len(b) == 2 for b in run)


def test_batch_order_accepts_items_or_sizes_and_per_item_repeats(tmp_path):
    make_image(tmp_path / "a.png", size=(64, 32))
    make_image(tmp_path / "b.png")
    items = scan_dataset(cfg(tmp_path))
    by_items = BatchOrder(items, 1, 1, seed=3)
    by_sizes = BatchOrder([(i.width, i.height) for i in items], 1, 1, seed=3)
    assert [by_items.batch(k) for k in range(10)] == [by_sizes.batch(k) for k in range(10)]
    weighted = BatchOrder(items, 1, [3, 1], seed=3)
    assert weighted.batches_per_epoch == 4
    assert Counter(weighted.batch(k)[0] for k in range(4)) == {0: 3, 1: 1}
    with pytest.raises(TrainerInputError, match="no items"):
        BatchOrder([], 1)


def test_fingerprint_follows_content_not_location(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    make_image(folder / "a.png")
    (folder / "a.txt").write_text("a red square")
    first = dataset_fingerprint(scan_dataset(cfg(folder)))
    moved = shutil.copytree(folder, tmp_path / "moved")
    assert dataset_fingerprint(scan_dataset(cfg(moved))) == first
    (folder / "a.txt").write_text("a red box")
    assert dataset_fingerprint(scan_dataset(cfg(folder))) != first


def test_bundled_samples_are_small_captioned_and_consistent():
    images = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix == ".png")
    assert 6 <= len(images) <= 8
    assert sum(p.stat().st_size for p in SAMPLES_DIR.iterdir()) < 300_000
    items = scan_dataset(DatasetConfig(folder=str(SAMPLES_DIR), resolutions=[128], trigger_word="sks"))
    assert len(items) == len(images)
    for item in items:
        assert Image.open(item.source).size == (128, 128)
        assert item.source.with_suffix(".txt").is_file()
        assert "sks robot" in item.caption and not item.caption.startswith("sks,")  # trigger not doubled


# --- every image mode users have decodes to the colours they see ---------------------------------------------------

def _half_and_half(path, mode, left, right, size=(32, 32), fmt="PNG", **save):
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    img.save(path, format=fmt, **save)


def _sixteen_bit(path, mode):
    import numpy as np

    values = np.zeros((32, 32), dtype=np.uint16)
    values[:, :16], values[:, 16:] = 16384, 49152  # a quarter and three quarters of the 16-bit range
    if mode == "I":
        Image.fromarray(values.astype(np.int32), "I").save(path, format="TIFF")  # opens as "I" whatever its name
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        Image.frombytes(mode, (32, 32), values.astype(dtype).tobytes()).save(path, format="TIFF" if mode == "I;16B"
                                                                             else "PNG")


def _palette_with_transparency(path):
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red but transparent, index 1 blue
    img.paste(1, (16, 0, 32, 32))
    img.save(path, format="PNG", transparency=0)


def _exif_rotated(path):
    img = Image.new("RGB", (64, 32), RED)
    img.paste(BLUE, (32, 0, 64, 32))
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: the left (red) half on top
    img.save(path, format="PNG", exif=exif)


WHITE, GREY_64, GREY_191 = (255, 255, 255), (64, 64, 64), (191, 191, 191)


@pytest.mark.parametrize("mode,write,first,second", [
    ("I;16", lambda p: _sixteen_bit(p, "I;16"), GREY_64, GREY_191),  # scaled, not clipped at 255 (white)
    ("I;16B", lambda p: _sixteen_bit(p, "I;16B"), GREY_64, GREY_191),
    ("I", lambda p: _sixteen_bit(p, "I"), GREY_64, GREY_191),
    ("P+transparency", _palette_with_transparency, WHITE, BLUE),  # transparent areas are white, as with alpha
    ("CMYK", lambda p: _half_and_half(p, "CMYK", (0, 255, 255, 0), (255, 255, 0, 0), fmt="JPEG", quality=100),
     RED, BLUE),
    ("LA", lambda p: _half_and_half(p, "LA", (0, 0), (0, 255)), WHITE, BLACK),
    ("RGBA", lambda p: _half_and_half(p, "RGBA", (255, 0, 0, 0), (0, 0, 255, 255)), WHITE, BLUE),
    ("EXIF rotation", _exif_rotated, RED, BLUE),
])
def test_every_image_mode_decodes_to_the_colours_shown(tmp_path, mode, write, first, second):
    """Left/top half ``first``, right/bottom half ``second``, as any image viewer shows the file."""
    write(tmp_path / "image.png")
    rotated = mode == "EXIF rotation"
    (item,) = scan_dataset(cfg(tmp_path, buckets=rotated, resolutions=[48 if rotated else 32]))
    pixels = (item.load_pixels() * 255).round()
    _, height, width = pixels.shape
    if rotated:
        assert (width, height) == (32, 64)
        halves = pixels[:, : height // 2 - 2], pixels[:, height // 2 + 2:]
    else:
        halves = pixels[:, :, : width // 2 - 2], pixels[:, :, width // 2 + 2:]
    for half, colour in zip(halves, (first, second)):
        expected = torch.tensor(colour, dtype=torch.float32)[:, None, None].expand_as(half)
        assert (half - expected).abs().max() <= 3, (mode, half.mean((1, 2)).tolist(), colour)
