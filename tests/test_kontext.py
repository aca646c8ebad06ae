"""Paired edit training (FLUX.1 Kontext, FLUX.2 reference images): the paired dataset and its errors, control
latents in the cache, the objective against diffusers' Kontext recipe and FLUX.2 pipeline ids, and a tiny edit LoRA
that learns its pair."""

import copy
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer_core import flow, lora
from trainer_core.config import DatasetConfig, LoraConfig, SampleConfig, TrainConfig
from trainer_core.data.cache import build_cache
from trainer_core.data.dataset import dataset_fingerprint, scan_dataset
from trainer_core.errors import TrainerInputError
from trainer_core.models import flux2
from trainer_core.models.family import FLUX1, FLUX2
from trainer_core.models.tiny import build_tiny_text_encoder, build_tiny_transformer, build_tiny_vae
from trainer_core.train import Callbacks, ValidationPrompts, reference_tokens, sample_validation, train_lora

SAMPLES = Path(__file__).resolve().parents[1] / "trainer_core" / "data" / "samples"


def _image(path: Path, size=(64, 64), colour=(200, 40, 40)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _pair_folders(tmp_path, targets=("a", "b"), controls=("a", "b"), target_size=(64, 64), control_size=(64, 64)):
    target_dir, control_dir = tmp_path / "targets", tmp_path / "controls"
    target_dir.mkdir()
    control_dir.mkdir()
    for i, stem in enumerate(targets):
        _image(target_dir / f"{stem}.png", target_size, (40 * i, 100, 200))
        (target_dir / f"{stem}.txt").write_text(f"make {stem} red")
    for i, stem in enumerate(controls):
        _image(control_dir / f"{stem}.png", control_size, (200, 40 * i, 40))
    return target_dir, control_dir


def _cfg(target_dir, control_dir, **kw):
    return DatasetConfig(folder=str(target_dir), control_folder=str(control_dir), resolutions=[64], **kw)


# ---------------------------------------------------------------------------------------------------------------
# Dataset and cache

def test_edit_pairs_scan_one_or_several_controls_per_target_in_order(tmp_path):
    target_dir, control_dir = _pair_folders(tmp_path, controls=())
    for stem in ("a", "b"):
        for n, colour in enumerate([(0, 0, 0), (255, 255, 255)]):
            _image(control_dir / f"{stem}_{n}.png", colour=colour)
    items = scan_dataset(_cfg(target_dir, control_dir))
    assert [Path(i.source).name for i in items] == ["a.png", "b.png"]
    assert [[Path(c.source).name for c in i.controls] for i in items] == [["a_0.png", "a_1.png"],
                                                                          ["b_0.png", "b_1.png"]]
    assert items[0].caption == "make a red"
    control = items[0].controls[1]
    assert (control.width, control.height, control.flip) == (64, 64, False)
    assert torch.allclose(control.load_pixels(), torch.ones(3, 64, 64))
    # the controls are part of what the model trains on: another control image is another dataset
    plain = scan_dataset(DatasetConfig(folder=str(target_dir), resolutions=[64]))
    assert dataset_fingerprint(items) != dataset_fingerprint(plain)


def test_edit_pair_controls_follow_their_targets_crop_and_flip(tmp_path):
    """A wider control on a wider target: same bucket, the control cropped at the target's relative spot, and the
    flipped twin's control flipped too."""
    target_dir, control_dir = _pair_folders(tmp_path, targets=("a",), controls=(), target_size=(96, 64))
    gradient = Image.linear_gradient("L").resize((192, 128)).convert("RGB")  # a control twice the target's size
    gradient.save(control_dir / "a.png")
    items = scan_dataset(_cfg(target_dir, control_dir, flip=True))
    assert len(items) == 2 and {i.flip for i in items} == {False, True}
    for item in items:
        (control,) = item.controls
        assert (control.width, control.height, control.flip) == (item.width, item.height, item.flip)
        assert control.crop[2] - control.crop[0] == 2 * (item.crop[2] - item.crop[0])
    assert torch.equal(items[1].controls[0].load_pixels(), items[0].controls[0].load_pixels().flip(-1))


@pytest.mark.parametrize("case,message", [
    ("target without control", r"target image '.*b\.png' has no control image"),
    ("control without target", r"control image '.*c\.png' has no target image of the same name"),
    ("aspect ratio",
     r"control image '.*a\.png' is 128×64 px.*falls into the .* bucket.*trains at 64×64.*Crop or pad"),
    ("numbering gap", r"controls of target image '.*a\.png' skip number 1"),
    ("single and numbered", r"target image '.*a\.png' has both 'a\.png' and numbered controls"),
    ("uneven counts", r"target image '.*b\.png' has 1 control image\(s\) but '.*a\.png' has 2"),
])
def test_edit_bad_pairs_are_refused_naming_the_file(tmp_path, case, message):
    target_dir, control_dir = _pair_folders(tmp_path)
    if case == "target without control":
        (control_dir / "b.png").unlink()
    elif case == "control without target":
        _image(control_dir / "c.png")
    elif case == "aspect ratio":
        _image(control_dir / "a.png", (128, 64))
    elif case == "numbering gap":
        (control_dir / "a.png").rename(control_dir / "a_0.png")
        _image(control_dir / "a_2.png")
    elif case == "single and numbered":
        _image(control_dir / "a_0.png")
    elif case == "uneven counts":
        (control_dir / "a.png").rename(control_dir / "a_0.png")
        _image(control_dir / "a_1.png")
    with pytest.raises(TrainerInputError, match=message):
        scan_dataset(_cfg(target_dir, control_dir))


def test_edit_control_folder_must_exist_and_differ_from_the_targets(tmp_path):
    target_dir, _ = _pair_folders(tmp_path)
    with pytest.raises(TrainerInputError, match=r"dataset.control_folder: '.*nowhere' does not exist"):
        scan_dataset(_cfg(target_dir, tmp_path / "nowhere"))
    with pytest.raises(TrainerInputError, match="dataset.control_folder: it is the target folder itself"):
        scan_dataset(_cfg(target_dir, target_dir))


def test_edit_control_latents_are_cached_beside_the_targets_and_reused(tmp_path):
    target_dir, control_dir = _pair_folders(tmp_path)
    items = scan_dataset(_cfg(target_dir, control_dir))
    vae, text = build_tiny_vae(seed=0), build_tiny_text_encoder(seed=0)
    cache = build_cache(items, vae, text, tmp_path / "cache")
    assert cache.encoded == 2 + 2 + 2 and cache.control_count == 1  # 2 targets, 2 controls, 2 captions
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 4
    control = cache.controls(1)[0]
    with torch.no_grad():
        expected = vae.encode(items[1].controls[0].load_pixels()[None])[0]
    assert torch.allclose(control.float(), expected.float(), atol=1e-6)
    assert not torch.allclose(control.float(), cache.latent(1).float())
    # a second run needs no encoder at all
    again = build_cache(scan_dataset(_cfg(target_dir, control_dir)), None, None, tmp_path / "cache")
    assert (again.reused, again.encoded) == (6, 0) and torch.equal(again.controls(1)[0], control)
    assert reference_tokens(again) == (64 // 16) ** 2


# ---------------------------------------------------------------------------------------------------------------
# The objective against diffusers

def _kontext_recipe_loss(transformer, model_input, cond_model_input, noise, sigmas, prompt_embeds, pooled,
                         guidance_scale):
    """diffusers' examples/dreambooth/train_dreambooth_lora_flux_kontext.py training step (weighting "none"), with
    FluxKontextPipeline's own helpers; ``sigmas`` = its timesteps / 1000."""
    from diffusers import FluxKontextPipeline

    vae_scale_factor = 8
    b, c, h, w = model_input.shape
    latent_image_ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    cb, cc, ch, cw = cond_model_input.shape
    cond_latents_ids = FluxKontextPipeline._prepare_latent_image_ids(cb, ch // 2, cw // 2, "cpu", torch.float32)
    cond_latents_ids[..., 0] = 1
    latent_image_ids = torch.cat([latent_image_ids, cond_latents_ids], dim=0)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)
    s = sigmas.view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - s) * model_input + s * noise
    packed = FluxKontextPipeline._pack_latents(noisy_model_input, b, c, h, w)
    n_target = packed.shape[1]
    packed = torch.cat([packed, FluxKontextPipeline._pack_latents(cond_model_input, cb, cc, ch, cw)], dim=1)
    model_pred = transformer(hidden_states=packed, timestep=sigmas, guidance=torch.tensor([guidance_scale]).expand(b),
                             pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                             img_ids=latent_image_ids, return_dict=False)[0]
    model_pred = model_pred[:, :n_target]
    model_pred = FluxKontextPipeline._unpack_latents(model_pred, h * vae_scale_factor, w * vae_scale_factor,
                                                     vae_scale_factor)
    target = noise - model_input
    return torch.mean(((model_pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


def test_kontext_per_step_loss_equals_diffusers_kontext_recipe():
    """Three LoRA steps from the same start on the same inputs: our loss (flow.flow_matching_loss with the control
    as a reference) and the recipe's agree to 1e-6 at every step, so the gradients agree too."""
    g = torch.Generator().manual_seed(0)
    ours = build_tiny_transformer(seed=3)
    lora.add_lora(ours, LoraConfig(rank=4, alpha=4, targets="all"), seed=0)
    for name, param in ours.named_parameters():  # non-zero B, so the LoRA acts from the first step
        if ".lora_B." in name:
            param.data.normal_(0, 0.05, generator=g)
    theirs = copy.deepcopy(ours)
    batches = []
    for _ in range(3):
        batches.append(dict(x0=torch.randn(2, 16, 8, 12, generator=g), control=torch.randn(2, 16, 6, 10, generator=g),
                            noise=torch.randn(2, 16, 8, 12, generator=g), sigma=torch.rand(2, generator=g),
                            hidden=torch.randn(2, 7, 32, generator=g), pooled=torch.randn(2, 32, generator=g)))
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    for step, b in enumerate(batches):
        loss_ours = flow.flow_matching_loss(ours, b["x0"], b["noise"], b["sigma"], b["hidden"], b["pooled"], 2.5,
                                            references=[b["control"]])
        loss_theirs = _kontext_recipe_loss(theirs, b["x0"], b["control"], b["noise"], b["sigma"], b["hidden"],
                                           b["pooled"], 2.5)
        assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-6 * abs(loss_theirs.item()), step
        for loss, opt in zip((loss_ours, loss_theirs), optimizers):
            loss.backward()
            opt.step()
            opt.zero_grad()
    # without the control the prediction differs: the reference tokens take part in attention
    with torch.no_grad():
        b = batches[0]
        plain = flow.flow_matching_loss(ours, b["x0"], b["noise"], b["sigma"], b["hidden"], b["pooled"], 2.5)
        paired = flow.flow_matching_loss(ours, b["x0"], b["noise"], b["sigma"], b["hidden"], b["pooled"], 2.5,
                                         references=[b["control"]])
    assert abs(plain.item() - paired.item()) > 1e-4


def test_kontext_first_reference_ids_are_diffusers_kontext_cond_ids():
    from diffusers import FluxKontextPipeline

    expected = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    expected[..., 0] = 1
    assert torch.equal(FLUX1.reference_ids([(6, 10)]), expected)


def test_edit_flux2_reference_ids_equal_flux2_pipeline():
    from diffusers import Flux2Pipeline

    latents = [torch.zeros(1, 128, 3, 5), torch.zeros(1, 128, 4, 2), torch.zeros(1, 128, 2, 2)]
    expected = Flux2Pipeline._prepare_image_ids(latents)[0]
    for n in (1, 2, 3):
        got = FLUX2.reference_ids([tuple(x.shape[-2:]) for x in latents[:n]])
        assert torch.equal(got, expected[:got.shape[0]]) and got.shape[0] == sum(x[0, 0].numel() for x in latents[:n])


def test_edit_flux2_loss_with_references_equals_the_pipeline_layout():
    """FLUX.2: target tokens, then each reference's tokens with Flux2Pipeline's ids, cut back to the target."""
    from diffusers import Flux2Pipeline

    model = flux2.build_tiny_flux2_transformer("klein", seed=2)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 128, 4, 6, generator=g), torch.randn(2, 128, 4, 6, generator=g)
    refs = [torch.randn(2, 128, 4, 6, generator=g), torch.randn(2, 128, 2, 4, generator=g)]
    sigma, hidden = torch.tensor([0.3, 0.7]), torch.randn(2, 5, 48, generator=g)
    with torch.no_grad():
        ours = flow.flow_matching_loss(model, x0, noise, sigma, hidden, torch.zeros(2, 0), 1.0, references=refs)
        x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        packed = Flux2Pipeline._pack_latents(x_t)
        tokens = torch.cat([packed, *(Flux2Pipeline._pack_latents(r) for r in refs)], dim=1)
        ids = torch.cat([Flux2Pipeline._prepare_latent_ids(x_t)[0],
                         Flux2Pipeline._prepare_image_ids([r[:1] for r in refs])[0]])
        pred = model(hidden_states=tokens, encoder_hidden_states=hidden, timestep=sigma, img_ids=ids,
                     txt_ids=Flux2Pipeline._prepare_text_ids(hidden)[0], guidance=None, return_dict=False)[0]
        pred = Flux2Pipeline._unpack_latents_with_ids(pred[:, :packed.shape[1]],
                                                      Flux2Pipeline._prepare_latent_ids(x_t))
        reference = ((pred - (noise - x0)) ** 2).mean()
    assert abs(ours.item() - reference.item()) <= 1e-6 * abs(reference.item())


# ---------------------------------------------------------------------------------------------------------------
# Training

def _one_pair(tmp_path):
    target_dir, control_dir = tmp_path / "targets", tmp_path / "controls"
    target_dir.mkdir()
    control_dir.mkdir()
    shutil.copy(SAMPLES / "robot_orange_walk.png", target_dir / "pair.png")
    (target_dir / "pair.txt").write_text("make the robot orange and walking")
    shutil.copy(SAMPLES / "robot_blue.png", control_dir / "pair.png")
    items = scan_dataset(_cfg(target_dir, control_dir, allow_upscale=True))
    return build_cache(items, build_tiny_vae(seed=0), build_tiny_text_encoder(seed=0), tmp_path / "cache",
                       empty_caption=True)


def test_edit_lora_learns_its_pair_and_samples_toward_the_target_with_the_control(tmp_path):
    """After training on one pair, sampling with the control (the validation sampler's control input) lands at
    least 2× nearer the target latent than the base model does."""
    cache = _one_pair(tmp_path)
    model = build_tiny_transformer(seed=0)
    sample_cfg = SampleConfig(steps=20, width=64, height=64, guidance=1.0, seed=1)
    prompts = ValidationPrompts([cache.text(0)], sample_cfg, controls=[cache.controls(0)])
    samples = []

    class Collect(Callbacks):
        def on_sample(self, step, latents):
            samples.append(latents)

    train_lora(model, cache, lora_cfg=LoraConfig(rank=16, alpha=16),
               train_cfg=TrainConfig(steps=100, learning_rate=5e-3, compute_dtype="fp32", checkpoint_every=0,
                                     timestep_sampling="shift", seed=7, caption_dropout=0.1),
               output_dir=tmp_path / "out", output_name="edit", device="cpu", validation=prompts,
               callbacks=Collect())
    target = cache.latent(0)[None].float()
    with_lora = sample_validation(model, prompts, "cpu")
    assert torch.equal(samples[-1], with_lora)  # the loop's final validation sample used the control
    model.disable_adapters()
    without = sample_validation(model, prompts, "cpu")
    err_lora = ((with_lora - target) ** 2).mean().item()
    err_base = ((without - target) ** 2).mean().item()
    print(f"edit LoRA vs base MSE to the target: {err_lora:.4f} vs {err_base:.4f}")
    assert err_lora * 2 < err_base, (err_lora, err_base)


def test_edit_masked_caption_dropout_run_resumes_bit_for_bit(tmp_path, stop_at):
    """A paired run with a target mask and caption dropout, stopped after step 3 and resumed, ends with the losses
    and LoRA of an uninterrupted run."""
    target_dir, control_dir = _pair_folders(tmp_path)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(target_dir / "a_mask.png")
    items = scan_dataset(_cfg(target_dir, control_dir, masked_loss=True))
    assert items[0].mask is not None and items[0].controls
    cache = build_cache(items, build_tiny_vae(seed=0), build_tiny_text_encoder(seed=0), tmp_path / "cache",
                        empty_caption=True)
    cfg = TrainConfig(steps=6, learning_rate=1e-3, compute_dtype="fp32", checkpoint_every=0,
                      timestep_sampling="sigmoid", seed=7, caption_dropout=0.5, batch_size=2)

    def run(out, **kwargs):
        return train_lora(build_tiny_transformer(seed=0), cache, lora_cfg=LoraConfig(rank=4, alpha=4), train_cfg=cfg,
                          output_dir=out, output_name="edit", device="cpu", **kwargs)

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", callbacks=stop_at(3))
    resumed = run(tmp_path / "split", resume=True)
    assert resumed.resumed_from == 3 and resumed.losses == whole.losses
    a, meta = lora.read_lora_file(whole.lora_path)
    b, _ = lora.read_lora_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["reference_images"] == "1"


def test_edit_cli_trains_paired_from_the_control_folder_setting(tmp_path, tiny_model_files, capsys):
    from trainer_core.cli import main

    target_dir, control_dir = _pair_folders(tmp_path)
    cfg = tmp_path / "run.toml"
    cfg.write_text(tiny_model_files.model_section() + f"""[dataset]
folder = "{target_dir.as_posix()}"
control_folder = "{control_dir.as_posix()}"
resolutions = [64]
[train]
compute_dtype = "fp32"
checkpoint_every = 0
[sample]
width = 64
height = 64
steps = 2
[output]
folder = "{(tmp_path / 'out').as_posix()}"
""")
    assert main(["train", "--config", str(cfg), "--steps", "2", "--name", "edit", "--device", "cpu"]) == 0
    _, meta = lora.read_lora_file(tmp_path / "out" / "edit.safetensors")
    assert meta["reference_images"] == "1" and meta["steps"] == "2"
    assert len(list((tmp_path / "out" / "cache" / "latents").iterdir())) == 4  # 2 targets + 2 controls
    (control_dir / "b.png").unlink()  # a broken pair is reported in one line
    assert main(["train", "--config", str(cfg), "--steps", "2", "--name", "edit2", "--device", "cpu"]) == 2
    assert re.search(r"error: dataset: target image '.*b\.png' has no control image", capsys.readouterr().err)


def test_edit_memory_plan_counts_the_reference_tokens(tmp_path):
    """The VRAM estimate (and the block-swap plan made from it) sees the sequence the paired step runs: target,
    text and one control's tokens."""
    from trainer_core.train import TrainingSession

    target_dir, control_dir = _pair_folders(tmp_path)
    vae, text = build_tiny_vae(seed=0), build_tiny_text_encoder(seed=0)
    paired = build_cache(scan_dataset(_cfg(target_dir, control_dir)), vae, text, tmp_path / "cache")
    plain = build_cache(scan_dataset(DatasetConfig(folder=str(target_dir), resolutions=[64])), vae, text,
                        tmp_path / "cache")
    sessions = [TrainingSession(build_tiny_transformer(seed=0), cache, LoraConfig(rank=4, alpha=4),
                                TrainConfig(steps=1, compute_dtype="fp32"), device="cpu") for cache in (plain, paired)]
    text_tokens = plain.text(0)[0].shape[0]
    assert sessions[0].vram_estimate.tokens == 16 + text_tokens  # 64 px: 4 × 4 image tokens
    assert sessions[1].vram_estimate.tokens == 16 + text_tokens + 16
    assert sessions[1].vram_estimate.total > sessions[0].vram_estimate.total


def test_edit_two_controls_per_target_reach_the_transformer_in_order(tmp_path, monkeypatch):
    """With ``name_0`` / ``name_1`` controls, every step gets two references: the batch's first controls, then its
    second ones, each stacked over the batch in the batch's order."""
    from trainer_core.train import TrainingSession

    target_dir, control_dir = _pair_folders(tmp_path, controls=())
    for stem in ("a", "b"):
        for n, colour in enumerate([(0, 0, 0), (255, 255, 255)]):
            _image(control_dir / f"{stem}_{n}.png", colour=colour)
    cache = build_cache(scan_dataset(_cfg(target_dir, control_dir)), build_tiny_vae(seed=0),
                        build_tiny_text_encoder(seed=0), tmp_path / "cache")
    seen = []
    real_loss = flow.flow_matching_loss

    def recording_loss(*args, references=(), **kwargs):
        seen.append([r.clone() for r in references])
        return real_loss(*args, references=references, **kwargs)

    monkeypatch.setattr(flow, "flow_matching_loss", recording_loss)
    session = TrainingSession(build_tiny_transformer(seed=0), cache, LoraConfig(rank=4, alpha=4),
                              TrainConfig(steps=2, compute_dtype="fp32", batch_size=2), device="cpu")
    for _ in range(2):
        assert torch.isfinite(torch.tensor(session.step()))
    for step, references in enumerate(seen):
        order = session.order.batch(step)
        assert len(references) == 2
        for k in range(2):
            assert torch.equal(references[k], torch.stack([cache.controls(i)[k] for i in order]).float())
    assert not torch.equal(seen[0][0], seen[0][1])
