"""Training options from issue #5: loss types, masked loss, caption dropout, tag shuffling, EMA and text-encoder
LoRAs. Each test fails if its option is ignored."""

import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer_core import checkpoint as ckpt
from trainer_core import flow, lora
from trainer_core.config import DatasetConfig, LoraConfig, TrainConfig
from trainer_core.data.cache import build_cache
from trainer_core.data.dataset import caption_variant, scan_dataset
from trainer_core.errors import TrainerInputError
from trainer_core.models.tiny import build_tiny_text_encoder, build_tiny_transformer, build_tiny_vae
from trainer_core.text_conditioning import TextConditioning
from trainer_core.train import TrainingSession, train_lora


SAMPLES = Path(__file__).resolve().parents[1] / "trainer_core" / "data" / "samples"
CAPTIONS = {"robot_blue": "sks, robot, blue background, standing, photo",
            "robot_pink_happy": "sks, robot, pink background, happy, photo"}


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """Two sample images with tag captions; robot_blue has a mask: left half white (train), right half black."""
    folder = tmp_path_factory.mktemp("tagged")
    for stem, caption in CAPTIONS.items():
        shutil.copy(SAMPLES / f"{stem}.png", folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption)
    width, height = Image.open(folder / "robot_blue.png").size
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    mask.save(folder / "robot_blue_mask.png")
    return folder


def _cache(folder, tmp_path, masked=False, empty_caption=False):
    items = scan_dataset(DatasetConfig(folder=str(folder), resolutions=[64], allow_upscale=True, masked_loss=masked))
    return build_cache(items, build_tiny_vae(seed=0), build_tiny_text_encoder(seed=0), tmp_path / "cache",
                       empty_caption=empty_caption)


def fast(**overrides):
    settings = dict(steps=4, learning_rate=1e-3, compute_dtype="fp32", checkpoint_every=0,
                    timestep_sampling="sigmoid", seed=5)
    settings.update(overrides)
    return TrainConfig(**settings)


# --- loss types ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type,huber_c", [("l2", 0.1), ("l1", 0.1), ("huber", 0.1), ("huber", 1.0),
                                               ("smooth_l1", 0.5)])
def test_loss_type_and_huber_c_reach_the_loss(sample_cache, monkeypatch, loss_type, huber_c):
    seen = []
    original = flow.elementwise_loss

    def spy(pred, target, kind="l2", c=0.1):
        seen.append((pred.detach(), target.detach(), kind, c))
        return original(pred, target, kind, c)

    monkeypatch.setattr(flow, "elementwise_loss", spy)
    session = TrainingSession(build_tiny_transformer(seed=0), sample_cache, LoraConfig(rank=2, alpha=2),
                              fast(loss_type=loss_type, huber_c=huber_c), device="cpu")
    loss = session.step()
    pred, target, kind, c = seen[0]
    assert (kind, c) == (loss_type, huber_c)
    err = pred - target
    expected = {"l2": err**2, "l1": err.abs(),
                "huber": 2 * huber_c * (torch.sqrt(err**2 + huber_c**2) - huber_c),
                "smooth_l1": torch.where(err.abs() < huber_c, 0.5 * err**2 / huber_c, err.abs() - 0.5 * huber_c)}
    assert loss == pytest.approx(expected[loss_type].mean().item(), rel=1e-5)


# --- masked loss --------------------------------------------------------------------------------------------------

def test_masks_are_found_next_to_images_and_cached_at_latent_resolution(tagged, tmp_path):
    cache = _cache(tagged, tmp_path, masked=True)
    assert [i.source.name for i in cache.items] == ["robot_blue.png", "robot_pink_happy.png"]  # mask not an image
    mask = cache.mask(0)
    assert mask.shape == (1, 8, 8)  # resampled like the image, so the edge cells blur a little
    assert mask[..., :4].min() > 0.95 and mask[..., 5:].max() < 0.01 and mask[..., 4].max() < 0.1
    assert cache.mask(1) is None and cache.has_masks
    unmasked = _cache(tagged, tmp_path / "plain")
    assert not unmasked.has_masks and len(unmasked) == 3  # without masked_loss the mask file is just an image
    assert unmasked.fingerprint != cache.fingerprint


def test_mask_of_the_wrong_size_is_refused(tagged, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tagged, folder)
    Image.new("L", (10, 10), 255).save(folder / "robot_blue_mask.png")
    with pytest.raises(TrainerInputError, match="robot_blue_mask.png.*image's size"):
        scan_dataset(DatasetConfig(folder=str(folder), resolutions=[64], allow_upscale=True, masked_loss=True))


def test_masked_loss_weights_every_latent_cell_by_its_mask(tagged, tmp_path, monkeypatch):
    """The batch loss is the mask-weighted mean: black cells count zero, items without a mask count fully."""
    cache = _cache(tagged, tmp_path, masked=True)
    seen = []
    original = flow.elementwise_loss
    monkeypatch.setattr(flow, "elementwise_loss", lambda p, t, *a: seen.append((p.detach(), t)) or original(p, t, *a))
    session = TrainingSession(build_tiny_transformer(seed=0), cache, LoraConfig(rank=2), fast(batch_size=2),
                              device="cpu")
    loss = session.step()
    pred, target = seen[0]
    err = (pred - target) ** 2
    weights = torch.stack([cache.mask(i) if cache.mask(i) is not None else torch.ones(1, 8, 8)
                           for i in session.order.batch(0)]).expand_as(err)
    assert sorted(session.order.batch(0)) == [0, 1]
    assert loss == pytest.approx(((err * weights).sum() / weights.sum()).item(), rel=1e-5)
    assert abs(loss - err.mean().item()) > 1e-3  # the unweighted mean would differ


def test_in_memory_masks_for_comfyui_batches():
    from trainer_core.data.dataset import dataset_from_images

    images = torch.rand(2, 64, 64, 3)
    masks = torch.zeros(2, 64, 64)
    masks[:, :, :32] = 1
    items = dataset_from_images(images, ["a"], DatasetConfig(resolutions=[64], masked_loss=True), masks=masks)
    weights = items[0].load_mask()
    assert weights.shape == (1, 64, 64) and weights[..., :30].min() > 0.99 and weights[..., 34:].max() < 0.01
    with pytest.raises(TrainerInputError, match="masks"):
        dataset_from_images(images, ["a"], DatasetConfig(resolutions=[64], masked_loss=True), masks=masks[:, :10])


# --- captions: dropout and tag shuffling --------------------------------------------------------------------------

def test_caption_variant_keeps_the_first_tags_and_shuffles_the_rest():
    caption = "sks, robot, blue, standing, photo, outdoors"
    variants = {caption_variant(caption, random.Random(i), shuffle=True, keep=2) for i in range(30)}
    assert len(variants) > 10
    assert all(v.startswith("sks, robot, ") and sorted(v.split(", ")) == sorted(caption.split(", ")) for v in variants)
    assert caption_variant(caption, random.Random(0)) == caption
    dropped = [caption_variant(caption, random.Random(i), dropout=0.3) for i in range(1000)]
    assert 250 < dropped.count("") < 350 and set(dropped) == {"", caption}


def test_caption_dropout_trains_on_the_cached_empty_caption(tagged, tmp_path):
    cache = _cache(tagged, tmp_path, empty_caption=True)
    text = TextConditioning(cache, None, LoraConfig(), fast(caption_dropout=0.5), torch.device("cpu"))
    empty_hidden, empty_pooled = cache.empty_text()
    generator = torch.Generator().manual_seed(0)
    dropped = 0
    for _ in range(40):
        hidden, pooled = text.batch([0, 1], generator)
        for b in range(2):
            is_empty = torch.equal(hidden[b], empty_hidden)
            assert is_empty == torch.equal(pooled[b], empty_pooled)
            assert is_empty or torch.equal(hidden[b], cache.text(b)[0])
            dropped += is_empty
    assert 25 < dropped < 55  # ≈ half of 80


def test_caption_dropout_without_an_empty_caption_or_encoder_is_a_clear_error(tagged, tmp_path):
    cache = _cache(tagged, tmp_path)
    with pytest.raises(TrainerInputError, match="caption_dropout.*empty caption"):
        TrainingSession(build_tiny_transformer(seed=0), cache, LoraConfig(rank=2), fast(caption_dropout=0.1),
                        device="cpu")
    # with the encoder it is encoded once, on the spot
    session = TrainingSession(build_tiny_transformer(seed=0), cache, LoraConfig(rank=2), fast(caption_dropout=0.1),
                              device="cpu", text_encoder=build_tiny_text_encoder(seed=0))
    assert torch.equal(session.text.empty[0], cache.empty_text()[0])


def test_shuffled_tags_are_encoded_live(tagged, tmp_path):
    cache = _cache(tagged, tmp_path)
    encoder = build_tiny_text_encoder(seed=0)
    with pytest.raises(TrainerInputError, match="shuffle_tags needs the text encoders during training"):
        TextConditioning(cache, None, LoraConfig(), fast(shuffle_tags=True), torch.device("cpu"))
    live = TextConditioning(cache, encoder, LoraConfig(), fast(), torch.device("cpu"))
    live.live_clip = live.live_t5 = True  # same captions, encoded live: identical to the cache
    hidden, pooled = live.batch([0, 1], torch.Generator())
    assert torch.allclose(hidden, torch.stack([cache.text(i)[0] for i in (0, 1)]), atol=1e-6)
    assert torch.allclose(pooled, torch.stack([cache.text(i)[1] for i in (0, 1)]), atol=1e-6)
    shuffled = TextConditioning(cache, encoder, LoraConfig(), fast(shuffle_tags=True, keep_tags=1),
                                torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    draws = [shuffled.batch([0], generator)[0] for _ in range(6)]
    assert any(not torch.allclose(d, draws[0]) for d in draws[1:])


def test_shuffled_tags_go_through_an_encode_only_text_encoder(tagged, tmp_path):
    """ComfyUI's CLIP reaches the trainer as a bare ``encode(captions)``: shuffled captions are encoded through it."""
    cache = _cache(tagged, tmp_path)
    encoder = build_tiny_text_encoder(seed=0)
    seen = []

    class EncodeOnly:
        def encode(self, captions):
            seen.append(list(captions))
            with torch.inference_mode():  # as ComfyUI's CLIPTextEncode produces them
                return encoder.encode(captions)

    text = TextConditioning(cache, EncodeOnly(), LoraConfig(), fast(shuffle_tags=True, keep_tags=1),
                            torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    hidden, pooled = text.batch([0, 1], generator)
    assert not hidden.is_inference() and hidden.shape[0] == pooled.shape[0] == 2
    first_tags = [c.split(", ")[0] for c in seen[0]]
    assert first_tags == [cache.items[i].caption.split(", ")[0] for i in (0, 1)]  # the kept tag stays first
    for _ in range(8):
        text.batch([0], generator)
    assert len({tuple(c) for c in seen[1:]}) > 1  # every batch draws a new order
    torch.testing.assert_close(text.batch([0], generator)[0], encoder.encode(seen[-1])[0])


# --- EMA ----------------------------------------------------------------------------------------------------------

def test_ema_weights_are_saved_alongside_and_differ_from_live(sample_cache, tmp_path):
    _, live_result = _train(sample_cache, tmp_path / "a", fast(steps=8, ema_decay=0.9),
                            LoraConfig(rank=4, export_formats=["kohya"]))
    names = sorted(p.name for p in live_result.extra_files)
    assert names == ["t_ema.safetensors", "t_ema_kohya.safetensors", "t_kohya.safetensors"]
    live, _ = lora.read_lora_file(live_result.lora_path)
    ema, meta = lora.read_lora_file(tmp_path / "a" / "t_ema.safetensors")
    assert live.keys() == ema.keys() and meta["ema_decay"] == "0.9"
    assert not all(torch.equal(live[k], ema[k]) for k in live)
    # a decay near zero follows the live weights exactly: the file really holds the average
    _, near = _train(sample_cache, tmp_path / "b", fast(steps=8, ema_decay=1e-9), LoraConfig(rank=4))
    live_b, _ = lora.read_lora_file(near.lora_path)
    ema_b, _ = lora.read_lora_file(near.extra_files[0])
    assert all(torch.equal(live_b[k], ema_b[k]) for k in live_b)


def _train(cache, folder, cfg, lora_cfg, **kw):
    model = kw.pop("model", None) or build_tiny_transformer(seed=0)
    return model, train_lora(model, cache, lora_cfg=lora_cfg, train_cfg=cfg, output_dir=folder, output_name="t",
                             device="cpu", **kw)


# --- text-encoder LoRAs -------------------------------------------------------------------------------------------

def _encode(encoder, caption="sks, robot"):
    return encoder.encode([caption])


@pytest.mark.parametrize("which", ["clip_l", "t5", "both"])
def test_text_encoder_lora_changes_only_the_trained_encoder(sample_cache, tmp_path, which):
    encoder = build_tiny_text_encoder(seed=0)
    hidden0, pooled0 = _encode(encoder)
    # The tiny model's prior init zeroes the modulation weights, which leaves the pooled (CLIP) vector without
    # influence; a plain random init lets both encoders' outputs reach the loss.
    _, result = _train(sample_cache, tmp_path, fast(steps=6, learning_rate=1e-2, text_encoder_lr=2e-2),
                       LoraConfig(rank=2, text_encoders=which, text_encoder_rank=4, text_encoder_alpha=4),
                       text_encoder=encoder, model=build_tiny_transformer(seed=0, prior_init=False))
    hidden1, pooled1 = _encode(encoder)
    assert torch.equal(pooled0, pooled1) == (which == "t5")
    assert torch.equal(hidden0, hidden1) == (which == "clip_l")
    state, _ = lora.read_lora_file(result.lora_path)
    assert any(k.startswith("text_encoder.text_model.") for k in state) == (which != "t5")
    assert any(k.startswith("text_encoders.t5xxl.transformer.encoder.") for k in state) == (which != "clip_l")
    rank = next(v for k, v in state.items() if k.startswith("text_encoder") and k.endswith("lora_A.weight"))
    assert rank.shape[0] == 4


def test_text_encoder_learning_rate_is_its_own_group(sample_cache):
    session = TrainingSession(build_tiny_transformer(seed=0), sample_cache, LoraConfig(rank=2, text_encoders="clip_l"),
                              fast(learning_rate=1e-3, text_encoder_lr=5e-5), device="cpu",
                              text_encoder=build_tiny_text_encoder(seed=0))
    assert [g["lr"] for g in session.optimizer.param_groups] == [1e-3, 5e-5]
    assert len(session.optimizer.param_groups[1]["params"]) == 2 * 6 * 2  # 2 CLIP layers × 6 linears × A, B
    with pytest.raises(TrainerInputError, match="text_encoders = 'clip_l' needs the CLIP-L and T5"):
        TrainingSession(build_tiny_transformer(seed=0), sample_cache, LoraConfig(rank=2, text_encoders="clip_l"),
                        fast(), device="cpu")


def test_resume_is_exact_with_text_encoder_lora_masks_and_dropout(tagged, tmp_path, stop_at):
    cache = _cache(tagged, tmp_path, masked=True, empty_caption=True)
    cfg = fast(steps=6, checkpoint_every=3, caption_dropout=0.3, ema_decay=0.8, loss_type="huber")
    lora_cfg = LoraConfig(rank=2, text_encoders="both")

    full_model, full = _train(cache, tmp_path / "full", cfg, lora_cfg, text_encoder=build_tiny_text_encoder(seed=0))

    with pytest.raises(KeyboardInterrupt):
        _train(cache, tmp_path / "split", cfg, lora_cfg, text_encoder=build_tiny_text_encoder(seed=0),
               callbacks=stop_at(3))
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints" / "t"))
    assert any(k.startswith("text_encoder") for k in saved.lora) and saved.ema
    _, resumed = _train(cache, tmp_path / "split", cfg, lora_cfg, text_encoder=build_tiny_text_encoder(seed=0),
                        resume=True)
    assert resumed.losses == full.losses
    for a, b in ((full.lora_path, resumed.lora_path), (full.extra_files[0], resumed.extra_files[0])):
        sa, sb = lora.read_lora_file(a)[0], lora.read_lora_file(b)[0]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
