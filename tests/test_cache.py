"""The latent/text cache: encode once, reuse by content, survive damage and interruptions."""

import hashlib
import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from trainer_core import fileio
from trainer_core.config import DatasetConfig
from trainer_core.data.cache import build_cache, build_prompt_cache
from trainer_core.data.dataset import BatchOrder, dataset_fingerprint, scan_dataset
from trainer_core.errors import TrainerInputError


class FakeVAE:
    """Deterministic 8× average-pool 'VAE' with 16 channels; counts calls."""

    def __init__(self, identity="fake-vae-1", dtype=torch.float32, channels=16, fail_on_call=None):
        self.identity, self.dtype, self.channels, self.fail_on_call = identity, dtype, channels, fail_on_call
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("out of memory (simulated)")
        p = F.avg_pool2d(images, 8)
        z = torch.cat([p, 1 - p, 2 * p - 1, p.mean(1, keepdim=True).expand(-1, 7, -1, -1)], 1)
        return z[:, : self.channels].to(self.dtype)


class FakeText:
    """Hash-seeded embeddings: hidden [B, 6, 8], pooled [B, 8]; records every batch of captions."""

    def __init__(self, identity="fake-text-1", dtype=torch.float32, poison=None):
        self.identity, self.dtype, self.poison = identity, dtype, poison
        self.calls = []

    def encode(self, captions):
        self.calls.append(list(captions))
        seeds = [int(hashlib.sha256(c.encode()).hexdigest()[:8], 16) for c in captions]
        hidden = torch.stack([torch.randn(6, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
        if self.poison is not None:
            hidden[0, 0, 0] = self.poison
        return hidden.to(self.dtype), hidden.mean(1).to(self.dtype)

    @property
    def captions_encoded(self):
        return [c for batch in self.calls for c in batch]


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, colour, caption in [("a", (255, 0, 0), "a red square"), ("b", (0, 255, 0), "a green square"),
                                  ("c", (0, 0, 255), "a blue square")]:
        img = Image.new("RGB", (32, 32), "white")
        img.paste(Image.new("RGB", (16, 32), colour))  # left half coloured: flipping changes the image
        img.save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(caption)
    return data


def scan(folder, **kw):
    return scan_dataset(DatasetConfig(folder=str(folder), resolutions=[32], **kw))


def files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_first_run_encodes_and_second_run_calls_no_encoder(folder, tmp_path):
    items = scan(folder)
    vae, text = FakeVAE(), FakeText()
    cache = build_cache(items, vae, text, tmp_path / "cache")
    assert vae.calls == 3 and sorted(text.captions_encoded) == sorted(i.caption for i in items)
    assert (cache.encoded, cache.reused) == (6, 0)
    assert len(cache) == 3 and cache.captions == [i.caption for i in items] and cache.sizes == [(32, 32)] * 3
    for i, item in enumerate(items):
        assert torch.equal(cache.latent(i), FakeVAE().encode(item.load_pixels()[None])[0])
        hidden, pooled = cache.text(i)
        expected = FakeText().encode([item.caption])
        assert torch.equal(hidden, expected[0][0]) and torch.equal(pooled, expected[1][0])

    vae2, text2 = FakeVAE(), FakeText()
    again = build_cache(scan(folder), vae2, text2, tmp_path / "cache")
    assert vae2.calls == 0 and text2.calls == []
    assert (again.encoded, again.reused) == (0, 6)

    # once cached the encoders can be dropped altogether
    offline = build_cache(scan(folder), None, None, tmp_path / "cache")
    assert all(torch.equal(offline.latent(i), cache.latent(i)) for i in range(3))
    assert offline.fingerprint == cache.fingerprint == dataset_fingerprint(items)
    order = BatchOrder(offline.sizes, 2, offline.repeats, seed=0)  # what the trainer builds from a cache
    assert len(order.batch(0)) == 2


def test_missing_encoder_for_uncached_data_is_a_clear_error(folder, tmp_path):
    text = FakeText()
    with pytest.raises(TrainerInputError, match=r"3 of 3 images have no cached entry.*Connect the VAE"):
        build_cache(scan(folder), None, text, tmp_path / "cache")
    assert text.calls == []  # refused before any work
    with pytest.raises(TrainerInputError, match=r"3 of 3 captions have no cached entry.*text encoders"):
        build_cache(scan(folder), FakeVAE(), None, tmp_path / "cache")


def test_changing_one_caption_reencodes_only_that_caption(folder, tmp_path):
    build_cache(scan(folder), FakeVAE(), FakeText(), tmp_path / "cache")
    (folder / "b.txt").write_text("a lime square")
    vae, text = FakeVAE(), FakeText()
    cache = build_cache(scan(folder), vae, text, tmp_path / "cache")
    assert vae.calls == 0 and text.calls == [["a lime square"]]
    assert torch.equal(cache.text(1)[0], FakeText().encode(["a lime square"])[0][0])


def test_identical_captions_share_one_file(folder, tmp_path):
    for name in "abc":
        (folder / f"{name}.txt").write_text("a square")
    text = FakeText()
    cache = build_cache(scan(folder, flip=True), FakeVAE(), text, tmp_path / "cache")
    assert len(cache) == 6 and text.calls == [["a square"]]
    assert len(files(tmp_path / "cache" / "text")) == 1
    assert len(files(tmp_path / "cache" / "latents")) == 6  # flipped twins are distinct latents
    assert not torch.equal(cache.latent(0), cache.latent(1))
    assert torch.equal(cache.latent(0), cache.latent(1).flip(-1))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong tensors"])
def test_damaged_cache_file_is_detected_and_reencoded(folder, tmp_path, caplog, damage):
    first = build_cache(scan(folder), FakeVAE(), FakeText(), tmp_path / "cache")
    latent_file = first._latent_files[1]
    text_file = first._text_files[2]
    for path in (latent_file, text_file):
        if damage == "wrong tensors":  # a valid file, but not what this entry needs
            save_file({"latent": torch.zeros(16, 2, 2)}, str(path))
            continue
        data = path.read_bytes()
        path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 40, "empty": b""}[damage])

    vae, text = FakeVAE(), FakeText()
    with caplog.at_level(logging.WARNING):
        cache = build_cache(scan(folder), vae, text, tmp_path / "cache")
    assert vae.calls == 1 and text.calls == [["a blue square"]]
    assert "encoding it again" in caplog.text and latent_file.name in caplog.text
    assert torch.equal(cache.latent(1), FakeVAE().encode(scan(folder)[1].load_pixels()[None])[0])
    cache.text(2)  # readable again


def test_interrupted_encoding_leaves_only_complete_files(folder, tmp_path):
    with pytest.raises(RuntimeError, match="simulated"):
        build_cache(scan(folder), FakeVAE(fail_on_call=2), FakeText(), tmp_path / "cache")
    assert len(files(tmp_path / "cache" / "latents")) == 1  # the one finished before the failure, nothing else
    vae = FakeVAE()
    build_cache(scan(folder), vae, FakeText(), tmp_path / "cache")
    assert vae.calls == 2  # the finished one is reused


def test_crash_while_writing_leaves_no_visible_file(folder, tmp_path, monkeypatch):
    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial header")
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        build_cache(scan(folder), FakeVAE(), FakeText(), tmp_path / "cache")
    assert files(tmp_path / "cache") == []  # not even a hidden temp file
    monkeypatch.undo()
    cache = build_cache(scan(folder), FakeVAE(), FakeText(), tmp_path / "cache")
    assert cache.encoded == 6


def test_encoder_identity_is_part_of_the_key(folder, tmp_path):
    build_cache(scan(folder), FakeVAE(), FakeText(), tmp_path / "cache")
    vae = FakeVAE(identity="fake-vae-2")
    build_cache(scan(folder), vae, FakeText(), tmp_path / "cache")
    assert vae.calls == 3
    with pytest.raises(TrainerInputError, match="2 different encoders.*Connect the encoder"):
        build_cache(scan(folder), None, FakeText(), tmp_path / "cache")


def test_stored_dtypes_and_bad_encoder_output(folder, tmp_path):
    cache = build_cache(scan(folder), FakeVAE(dtype=torch.bfloat16), FakeText(dtype=torch.float64), tmp_path / "c1")
    assert cache.latent(0).dtype == torch.bfloat16  # kept as the encoder returns it
    assert cache.text(0)[0].dtype == torch.float32  # fp64 narrowed to fp32
    with pytest.raises(TrainerInputError, match="NaN or infinite.*caption"):
        build_cache(scan(folder), FakeVAE(), FakeText(poison=float("inf")), tmp_path / "c2")
    with pytest.raises(TrainerInputError, match=r"returned \[1, 4, 4, 4\].*16 latent channels"):
        build_cache(scan(folder), FakeVAE(channels=4), FakeText(), tmp_path / "c3")


def test_prompt_cache_shares_the_caption_cache(folder, tmp_path):
    build_cache(scan(folder), FakeVAE(), FakeText(), tmp_path / "cache")
    text = FakeText()
    prompts = ["a red square", "a robot", "a robot"]
    encoded = build_prompt_cache(prompts, text, tmp_path / "cache")
    assert text.calls == [["a robot"]]  # the dataset caption was cached already; duplicates once
    assert [h.shape for h, _ in encoded] == [(6, 8)] * 3 and [p.shape for _, p in encoded] == [(8,)] * 3
    again = build_prompt_cache(prompts, None, tmp_path / "cache")
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(encoded, again))
    assert build_prompt_cache([], None, tmp_path / "cache") == []


def test_progress_counts_every_unique_entry(folder, tmp_path):
    (folder / "c.txt").write_text("a red square")  # two items share a caption: 3 latents + 2 captions
    seen = []
    build_cache(scan(folder), FakeVAE(), FakeText(), tmp_path / "cache", progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
