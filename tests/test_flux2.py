"""FLUX.2 (klein base, dev) behind the model-family seam: the objective equals diffusers' FLUX.2 recipes, weights
convert BFL ⇄ diffusers exactly, the family is detected from the weights, and a tiny FLUX.2 trains through
``train_lora`` into a LoRA that diffusers' FLUX.2 loaders apply to identical outputs."""

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from trainer_core import flow, lora
from trainer_core.config import DatasetConfig, LoraConfig, SampleConfig, TrainConfig
from trainer_core.data.cache import LatentCache
from trainer_core.errors import TrainerInputError
from trainer_core.memory.estimate import estimate_vram
from trainer_core.models import family, flux2
from trainer_core.models.family import FLUX1, FLUX2, detect_family
from trainer_core.models.flux import diffusers_to_bfl as flux1_diffusers_to_bfl
from trainer_core.models.flux import load_flux_transformer
from trainer_core.models.tiny import build_tiny_transformer
from trainer_core.train import Callbacks, TrainingSession, ValidationPrompts, train_lora

VARIANTS = ["klein", "dev"]


def _text_width(variant):
    return flux2.tiny_flux2_config(variant)["joint_attention_dim"]


# ---------------------------------------------------------------------------------------------------------------
# The objective against diffusers' reference recipes (examples/dreambooth/train_dreambooth_lora_flux2[_klein].py)

def _recipe_loss(transformer, vae_latents, bn_mean, bn_std, noise, u, prompt_embeds, guidance_scale):
    """The recipes' training step, written with diffusers' own pipeline helpers and scheduler, minus the optimizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    # FLUX.2's scheduler config: dynamic shifting, so its training sigmas are the unshifted grid
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, time_shift_type="exponential")
    model_input = Flux2KleinPipeline._patchify_latents(vae_latents)
    model_input = (model_input - bn_mean) / bn_std
    model_input_ids = Flux2KleinPipeline._prepare_latent_ids(model_input)
    text_ids = Flux2KleinPipeline._prepare_text_ids(prompt_embeds)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    packed = Flux2KleinPipeline._pack_latents(noisy)
    guidance = (torch.full([1], guidance_scale).expand(model_input.shape[0])
                if transformer.config.guidance_embeds else None)
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=model_input_ids,
                       return_dict=False)[0]
    pred = Flux2KleinPipeline._unpack_latents_with_ids(pred[:, : packed.size(1):], model_input_ids)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean(), model_input, sigmas.flatten()


@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_loss_equals_diffusers_reference_recipe(variant):
    model = flux2.build_tiny_flux2_transformer(variant, seed=1)
    g = torch.Generator().manual_seed(0)
    vae_latents = torch.randn(2, 32, 8, 12, generator=g)  # the FLUX.2 VAE's raw 32 channels at /8
    bn_mean, bn_std = torch.randn(1, 128, 1, 1, generator=g), torch.rand(1, 128, 1, 1, generator=g) + 0.5
    noise = torch.randn(2, 128, 4, 6, generator=g)
    u = torch.tensor([0.27, 0.81])
    hidden = torch.randn(2, 7, _text_width(variant), generator=g)
    with torch.no_grad():
        reference, x0, sigma = _recipe_loss(model, vae_latents, bn_mean, bn_std, noise, u, hidden, 3.5)
        # x0 is what ComfyUI's FLUX.2 VAE encode returns (and the cache holds): 128 channels at /16, normalised
        ours = flow.flow_matching_loss(model, x0, noise, sigma, hidden, torch.zeros(2, 0), guidance=3.5)
    assert x0.shape == (2, 128, 4, 6)
    assert abs(ours.item() - reference.item()) <= 1e-6 * abs(reference.item())


def test_flux2_packing_and_ids_match_diffusers_pipeline():
    from diffusers import Flux2KleinPipeline

    x = torch.randn(2, 128, 3, 5)
    tokens = FLUX2.pack_latents(x)
    assert torch.equal(tokens, Flux2KleinPipeline._pack_latents(x))
    assert torch.equal(FLUX2.unpack_latents(tokens, 3, 5), x)
    assert torch.equal(FLUX2.image_ids(3, 5), Flux2KleinPipeline._prepare_latent_ids(x)[0])
    assert torch.equal(FLUX2.text_ids(9), Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 9, 4))[0])
    assert FLUX2.latent_shape(1024, 768) == (128, 64, 48) and FLUX2.image_token_count(64, 64) == 4096


@pytest.mark.parametrize("tokens,steps", [(256, 28), (1024, 50), (4096, 4), (8192, 50)])
def test_flux2_sampling_schedule_equals_the_pipeline_scheduler(tokens, steps):
    """FLUX.2's resolution shift (its pipelines' compute_empirical_mu) gives the schedule diffusers samples with."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, time_shift_type="exponential")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    ours = flow.sampling_sigmas(steps, tokens, family=FLUX2)
    assert torch.allclose(ours, scheduler.sigmas.float(), atol=1e-6)
    # FLUX.1 keeps its own shift: 3.158 at 1024² whatever the step count
    assert FLUX1.resolution_shift(4096, steps) == pytest.approx(3.158, abs=2e-3)


def test_flux2_flux_shift_sampler_uses_the_family_shift():
    draw = lambda fam: flow.sample_sigmas(2000, "flux_shift", 4096, torch.Generator().manual_seed(3),  # noqa: E731
                                          family=fam)
    plain = flow.sample_sigmas(2000, "sigmoid", 4096, torch.Generator().manual_seed(3))
    shift = FLUX2.resolution_shift(4096)
    assert torch.allclose(draw(FLUX2), flow.shift_sigmas(plain, shift))
    assert not torch.allclose(draw(FLUX2), draw(FLUX1))


# ---------------------------------------------------------------------------------------------------------------
# Weights: BFL ⇄ diffusers, loading, detection

@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_bfl_diffusers_conversion_round_trips_exactly(variant):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    model = flux2.build_tiny_flux2_transformer(variant, seed=2, prior_init=False)
    sd = model.state_dict()
    bfl = flux2.diffusers_to_bfl(sd)
    width = model.inner_dim
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * width, width)
    assert "single_blocks.0.linear1.weight" in bfl and "double_stream_modulation_img.lin.weight" in bfl
    assert ("guidance_in.in_layer.weight" in bfl) == (variant == "dev")
    assert len(bfl) < len(sd)  # q, k, v fused

    back, config = flux2.bfl_to_diffusers(bfl)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert {k: v for k, v in config.items() if not k.startswith("_")} == flux2.tiny_flux2_config(variant)
    assert all(torch.equal(flux2.diffusers_to_bfl(back)[k], bfl[k]) for k in bfl)
    # diffusers' own converter (an independent implementation of the same table) agrees tensor for tensor
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert theirs.keys() == sd.keys() and all(torch.equal(theirs[k], sd[k]) for k in sd)


def _velocity(model, variant, seed=5):
    g = torch.Generator().manual_seed(seed)
    x, hidden = torch.randn(1, 128, 2, 3, generator=g), torch.randn(1, 4, _text_width(variant), generator=g)
    with torch.no_grad():
        return flow.predict_velocity(model, x, torch.tensor([0.4]), hidden, torch.zeros(1, 0), 2.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_loads_from_comfyui_file_diffusers_folder_and_state_dict(tmp_path, variant):
    model = flux2.build_tiny_flux2_transformer(variant, seed=3, prior_init=False)
    expected = _velocity(model, variant)
    comfy_file = tmp_path / "flux2.safetensors"  # ComfyUI's layout: BFL keys behind model.diffusion_model.
    bfl = flux2.diffusers_to_bfl(model.state_dict())
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()}, str(comfy_file))
    model.save_pretrained(tmp_path / "folder")
    weights = model.state_dict()
    for source in (comfy_file, tmp_path / "folder", weights):
        loaded = family.load_transformer(source, dtype=torch.float32)
        assert type(loaded).__name__ == "Flux2Transformer2DModel"
        assert all(loaded.config[k] == v for k, v in flux2.tiny_flux2_config(variant).items())
        state = loaded.state_dict()
        assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
        # same weights; memory-mapped tensors may take another SIMD path, hence not bit-equal outputs
        assert torch.allclose(_velocity(loaded, variant), expected, rtol=0, atol=1e-5)


def test_flux2_fp8_file_loads_dequantised(tmp_path):
    model = flux2.build_tiny_flux2_transformer("klein", seed=3, prior_init=False)
    bfl = {k: v.to(torch.float8_e4m3fn) for k, v in flux2.diffusers_to_bfl(model.state_dict()).items()}
    save_file(bfl, str(tmp_path / "fp8.safetensors"))
    loaded = flux2.load_flux2_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    key = "transformer_blocks.0.attn.to_k.weight"
    width = model.inner_dim
    assert torch.equal(loaded.state_dict()[key], bfl["double_blocks.0.img_attn.qkv.weight"][width:2 * width].float())


def test_flux2_and_flux1_files_are_told_apart(tmp_path):
    flux1_model = build_tiny_transformer(seed=0, prior_init=False)
    flux1_file, flux2_file = tmp_path / "flux1.safetensors", tmp_path / "flux2.safetensors"
    save_file({k: v.contiguous() for k, v in flux1_diffusers_to_bfl(flux1_model.state_dict()).items()},
              str(flux1_file))
    model2 = flux2.build_tiny_flux2_transformer("klein", prior_init=False)
    save_file({k: v.contiguous() for k, v in flux2.diffusers_to_bfl(model2.state_dict()).items()}, str(flux2_file))

    # handled: the family is read from the weights
    assert type(family.load_transformer(flux1_file, dtype=torch.float32)).__name__ == "FluxTransformer2DModel"
    assert type(family.load_transformer(flux2_file, dtype=torch.float32)).__name__ == "Flux2Transformer2DModel"
    assert detect_family(flux1_model) is FLUX1 and detect_family(model2) is FLUX2
    assert detect_family(dict(model2.config)) is FLUX2 and detect_family(flux1_model.state_dict()) is FLUX1
    # refused with a message naming both, where one family's loader is given the other's file
    with pytest.raises(TrainerInputError, match=r"(?s)FLUX\.2.*FLUX\.1|FLUX\.1.*FLUX\.2"):
        load_flux_transformer(flux2_file, dtype=torch.float32)
    with pytest.raises(TrainerInputError, match=r"not a FLUX\.2 transformer: it is a FLUX\.1 transformer"):
        flux2.load_flux2_transformer(flux1_file, dtype=torch.float32)
    with pytest.raises(TrainerInputError, match="neither a FLUX.1 nor a FLUX.2 transformer: it looks like a VAE"):
        detect_family({"encoder.down.0.weight": torch.zeros(1)})


def test_flux2_shipped_configs_have_the_published_sizes():
    params = {}
    for name in flux2.CONFIG_NAMES:
        from diffusers import Flux2Transformer2DModel

        config = {k: v for k, v in flux2.flux2_config(name).items() if not k.startswith("_")}
        with torch.device("meta"):
            params[name] = sum(p.numel() for p in Flux2Transformer2DModel(**config).parameters()) / 1e9
    assert params["flux2-klein-4b"] == pytest.approx(3.9, abs=0.1)
    assert params["flux2-klein-9b"] == pytest.approx(9.1, abs=0.1)
    assert params["flux2-dev"] == pytest.approx(32.2, abs=0.1)  # ≈ 60 GB in bf16
    # the estimator builds FLUX.2 from its config: dev's bf16 weights alone are ≈ 60 GiB
    estimate = estimate_vram(flux2.flux2_config("flux2-dev"), resolution=1024)
    assert 58 < estimate.weights / 2**30 < 62


# ---------------------------------------------------------------------------------------------------------------
# Target presets

def test_flux2_target_presets_hit_only_linears_of_their_kind():
    model = flux2.build_tiny_flux2_transformer("dev", prior_init=False)
    import re

    modules = dict(model.named_modules())
    for name in lora.TARGET_PRESETS:
        pattern = lora.resolve_targets(name, model)
        hits = [n for n in modules if re.fullmatch(pattern, n)]
        assert hits and all(isinstance(modules[n], torch.nn.Linear) for n in hits), name  # never to_out's ModuleList
    attention = {n for n in modules if re.fullmatch(lora.resolve_targets("attention", model), n)}
    assert "transformer_blocks.0.attn.to_out.0" in attention and "single_transformer_blocks.2.attn.to_out" in attention
    assert not any(".ff" in n for n in attention)
    mlp = {n for n in modules if re.fullmatch(lora.resolve_targets("attention+ffs", model), n)} - attention
    assert mlp == {f"transformer_blocks.0.{ff}.{lin}" for ff in ("ff", "ff_context")
                   for lin in ("linear_in", "linear_out")}
    every = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n.count(".") >= 1
             and not n.startswith(("time_guidance_embed", "norm_out"))}
    assert {n for n in modules if re.fullmatch(lora.resolve_targets("all", model), n)} == every
    # block 7 of 38 at the same relative depth of 3 single blocks: block 1, its fused output linear
    assert lora.resolve_targets("nano", model) == r"single_transformer_blocks\.1\.attn\.to_out"


# ---------------------------------------------------------------------------------------------------------------
# End to end through train_lora

def _flux2_standin_cache(sample_cache, folder, variant) -> LatentCache:
    """The bundled samples as a FLUX.2 cache would hold them: latents 128 channels at /16 (the FLUX.1 tiny VAE's
    latents pixel-shuffled 2×2 and mapped by a fixed orthonormal matrix), text states as wide as the model's text
    input (the tiny T5 states through a fixed linear map) and no pooled vector."""
    g = torch.Generator().manual_seed(11)
    channels, _ = torch.linalg.qr(torch.randn(128, 64, generator=g))
    text_map = torch.randn(_text_width(variant), 32, generator=g) / 32**0.5
    folder.mkdir()
    latent_files, text_files = [], []
    for i in range(len(sample_cache)):
        latent = sample_cache.latent(i).float()  # [16, 8, 8]
        c, h, w = latent.shape
        shuffled = latent.view(c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3).reshape(4 * c, h // 2, w // 2)
        hidden, _ = sample_cache.text(i)
        latent_files.append(folder / f"latent{i}.safetensors")
        text_files.append(folder / f"text{i}.safetensors")
        save_file({"latent": torch.einsum("oc,chw->ohw", channels, shuffled).contiguous()}, str(latent_files[-1]))
        hidden = hidden[:16].float()  # 16 tokens keep the test fast; the width is what FLUX.2 checks
        save_file({"hidden": (hidden @ text_map.T).contiguous(), "pooled": torch.zeros(0)},
                  str(text_files[-1]))
    return LatentCache(sample_cache.items, latent_files, text_files)


@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_trains_end_to_end_and_its_lora_loads_in_diffusers(sample_cache, tmp_path, variant):
    from diffusers import Flux2KleinPipeline

    cache = _flux2_standin_cache(sample_cache, tmp_path / "cache", variant)
    assert cache.latent(0).shape == (128, 4, 4)
    model = flux2.build_tiny_flux2_transformer(variant, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x0 = torch.stack([cache.latent(i) for i in range(len(cache))]).float()
    hidden = torch.stack([cache.text(i)[0] for i in range(len(cache))]).float()
    noise, sigma = torch.randn(x0.shape, generator=g), torch.linspace(0.1, 0.9, len(cache))

    def held_out_loss():  # the same noise and σ for every image, before and after training
        with torch.no_grad():
            return flow.flow_matching_loss(model, x0, noise, sigma, hidden, torch.zeros(len(cache), 0), 1.0).item()

    before = held_out_loss()
    cfg = TrainConfig(steps=30, learning_rate=1e-2, compute_dtype="fp32", checkpoint_every=0,
                      timestep_sampling="uniform", seed=7)
    prompts = ValidationPrompts([cache.text(0)], SampleConfig(steps=2, width=64, height=64, guidance=1.0, seed=1))
    samples = []

    class Collect(Callbacks):  # validation latents come back in FLUX.2's layout
        def on_sample(self, step, latents):
            samples.append(latents)

    result = train_lora(model, cache, lora_cfg=LoraConfig(rank=8, alpha=4, targets="attention+ffs"), train_cfg=cfg,
                        output_dir=tmp_path / "out", output_name="flux2", device="cpu", validation=prompts,
                        callbacks=Collect())
    after = held_out_loss()
    assert len(result.losses) == 30 and after < 0.9 * before, (before, after)
    assert samples and samples[-1].shape == (1, 128, 4, 4) and torch.isfinite(samples[-1]).all()
    frozen = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(frozen[k], base[k]) for k in base)

    state, meta = lora.read_lora_file(result.lora_path)
    assert state and all(k.startswith("transformer.") for k in state)
    assert any(".attn.to_qkv_mlp_proj." in k for k in state) and any(".ff.linear_in." in k for k in state)
    assert float(meta["alpha"]) == 4 and int(meta["rank"]) == 8  # alpha/rank is folded into lora_B
    assert meta["modelspec.architecture"] == f"flux-2-{variant}/lora"

    expected = _velocity(model, variant)
    lora_effect = (_velocity(flux2.build_tiny_flux2_transformer(variant, seed=0), variant) - expected).norm()

    def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
        """Equal up to the file's bf16 rounding of the LoRA, which is far below what the LoRA changes."""
        assert (got - want).norm() <= 1e-3 * want.norm() < 0.1 * lora_effect

    # diffusers' Flux2LoraLoaderMixin route: its lora_state_dict, then load_lora_into_transformer with the metadata
    sd, adapter_meta = Flux2KleinPipeline.lora_state_dict(str(result.lora_path), return_lora_metadata=True)
    fresh = flux2.build_tiny_flux2_transformer(variant, seed=0)
    Flux2KleinPipeline.load_lora_into_transformer(sd, transformer=fresh, metadata=adapter_meta)
    assert_close(_velocity(fresh, variant), expected)
    # and the model's own load_lora_adapter on the file
    fresh = flux2.build_tiny_flux2_transformer(variant, seed=0)
    fresh.load_lora_adapter(str(result.lora_path.parent), weight_name=result.lora_path.name, prefix="transformer")
    assert_close(_velocity(fresh, variant), expected)
    assert not torch.allclose(_velocity(flux2.build_tiny_flux2_transformer(variant, seed=0), variant), expected)


def test_flux1_embeddings_are_refused_for_flux2_before_training(sample_cache):
    with pytest.raises(TrainerInputError, match=r"cache: text embeddings are \[\d+, 32\].*FLUX\.2.*48 wide"):
        TrainingSession(flux2.build_tiny_flux2_transformer("klein"), sample_cache, LoraConfig(rank=4, alpha=4),
                        TrainConfig(steps=1, compute_dtype="fp32"), device="cpu")


def test_flux2_kohya_export_loads_through_diffusers_flux2_converter(tmp_path):
    """The kohya file (BFL names: fused double-block qkv, single-block linear1/linear2) is read by diffusers' own
    FLUX.2 kohya converter back into the same model outputs."""
    from diffusers import Flux2KleinPipeline

    model = flux2.build_tiny_flux2_transformer("klein", seed=4)
    lora.add_lora(model, LoraConfig(rank=4, alpha=2.0, targets="attention+ffs"))
    with torch.no_grad():  # lora_B starts at zero: give the adapter an effect
        for param in lora.lora_parameters(model):
            param.normal_(std=0.05, generator=torch.Generator().manual_seed(param.numel()))
    path = lora.save_lora(tmp_path / "k.safetensors", model, {}, dtype=None, fmt="kohya")
    state, _ = lora.read_lora_file(path)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in state
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in state
    assert "lora_unet_double_blocks_0_txt_mlp_0.alpha" in state

    fresh = flux2.build_tiny_flux2_transformer("klein", seed=4)
    Flux2KleinPipeline.load_lora_into_transformer(Flux2KleinPipeline.lora_state_dict(str(path)), transformer=fresh)
    expected = _velocity(model, "klein")
    assert torch.allclose(_velocity(fresh, "klein"), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(_velocity(flux2.build_tiny_flux2_transformer("klein", seed=4), "klein"), expected,
                              atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Encoders: the FLUX.2 VAE and text conditioning against diffusers' FLUX.2 pipelines

def test_flux2_vae_latents_equal_the_pipeline_encoding_and_a_flux1_vae_is_refused(tmp_path):
    from diffusers import Flux2KleinPipeline

    from trainer_core.models.encoders import load_vae
    from trainer_core.models.flux2_encoders import build_tiny_flux2_vae, load_flux2_vae
    from trainer_core.models.tiny import build_tiny_vae

    vae = build_tiny_flux2_vae(seed=3)
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    ours = vae.encode(images)
    assert ours.shape == (2, 128, 4, 3)
    pipe = Flux2KleinPipeline(scheduler=None, vae=vae.vae, text_encoder=None, tokenizer=None, transformer=None)
    with torch.no_grad():  # what the DreamBooth recipes cache and the pipelines condition on: pixels in −1..1
        reference = pipe._encode_vae_image(images * 2 - 1, generator=None)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-6)
    # normalised by the BatchNorm statistics: not the raw shuffled latents
    assert not torch.allclose(ours, torch.nn.functional.pixel_unshuffle(
        vae.vae.encode(images * 2 - 1).latent_dist.mode(), 2), atol=1e-3)

    vae.vae.save_pretrained(tmp_path / "vae")
    loaded = load_flux2_vae(tmp_path / "vae", dtype=torch.float32)
    assert torch.equal(loaded.encode(images), ours) and loaded.identity == vae.identity
    assert loaded.decode(ours).shape == (2, 3, 64, 48)
    build_tiny_vae(seed=0).vae.save_pretrained(tmp_path / "flux1_vae")
    with pytest.raises(TrainerInputError, match=r"FLUX\.2 transformer needs the FLUX\.2 VAE.*FLUX\.1 VAE"):
        load_flux2_vae(tmp_path / "flux1_vae")
    with pytest.raises(TrainerInputError, match=r"FLUX\.2 VAE, which only FLUX\.2 transformers take; a FLUX\.1"):
        load_vae(tmp_path / "vae")


def _causal_lm(variant, text):
    """The tiny text model as the pipelines hold it: the ForCausalLM class around the same weights."""
    from transformers import MistralForCausalLM, Qwen3ForCausalLM

    cls = Qwen3ForCausalLM if variant == "klein" else MistralForCausalLM
    model = cls(text.model.config).eval()
    missing, _ = model.load_state_dict({f"model.{k}": v for k, v in text.model.state_dict().items()}, strict=False)
    assert missing == ["lm_head.weight"]
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_text_embeddings_equal_the_pipeline_prompt_encoding(tmp_path, variant):
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from trainer_core.models.flux2_encoders import (TINY_MAX_LENGTH, build_tiny_flux2_text_encoder,
                                                    load_flux2_text_encoder)

    text = build_tiny_flux2_text_encoder(variant, seed=1)
    prompts = ["a photo of sks robot on a blue background", "two [IMG] cats"]
    hidden, pooled = text.encode(prompts)
    assert hidden.shape == (2, TINY_MAX_LENGTH, _text_width(variant)) and pooled.shape == (2, 0)
    lm = _causal_lm(variant, text)
    with torch.no_grad():
        if variant == "klein":
            reference = Flux2KleinPipeline._get_qwen3_prompt_embeds(lm, text.tokenizer, prompts,
                                                                   max_sequence_length=TINY_MAX_LENGTH)
        else:
            reference = Flux2Pipeline._get_mistral_3_small_prompt_embeds(lm, text.tokenizer, prompts,
                                                                         max_sequence_length=TINY_MAX_LENGTH)
    assert torch.allclose(hidden, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(hidden[0], hidden[1])

    # from the files users have: a transformers folder (the ForCausalLM checkpoint) with its tokenizer beside it
    lm.save_pretrained(tmp_path / "text_encoder")
    text.tokenizer.save_pretrained(tmp_path / "tokenizer")
    sources = [tmp_path / "text_encoder"]
    if variant == "klein":  # and ComfyUI's single file (qwen_3_4b layout: model.… keys)
        save_file({f"model.{k}": v.contiguous() for k, v in text.model.state_dict().items()},
                  str(tmp_path / "qwen.safetensors"))
        sources.append(tmp_path / "qwen.safetensors")
    for source in sources:
        loaded = load_flux2_text_encoder(source, tmp_path / "tokenizer", TINY_MAX_LENGTH, dtype=torch.float32)
        assert torch.allclose(loaded.encode(prompts)[0], reference, rtol=0, atol=1e-6), source


# ---------------------------------------------------------------------------------------------------------------
# Validation samples against the pipelines, with a LoRA loaded through load_lora_weights

@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_samples_equal_the_pipeline_and_its_lora_loads_through_load_lora_weights(tmp_path, variant):
    """klein base: real CFG against a negative prompt; dev: its guidance embedding. The same Euler loop, noise and
    decode give the images Flux2KleinPipeline / Flux2Pipeline give once they load our LoRA file."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    from trainer_core.models.flux2_encoders import build_tiny_flux2_text_encoder, build_tiny_flux2_vae
    from trainer_core.train import sample_validation

    model = flux2.build_tiny_flux2_transformer(variant, seed=6)
    lora.add_lora(model, LoraConfig(rank=4, alpha=2.0, targets="attention+ffs"))
    with torch.no_grad():  # lora_B starts at zero: give the adapter an effect
        for param in lora.lora_parameters(model):
            param.normal_(std=0.05, generator=torch.Generator().manual_seed(param.numel()))
    path = lora.save_lora(tmp_path / "l.safetensors", model, {}, dtype=None)
    # alpha/rank is folded into lora_B, and FLUX.2 files leave alpha (= rank) out: load_lora_weights refuses it
    assert not any(k.endswith(".alpha") for k in lora.read_lora_file(path)[0])

    vae, text = build_tiny_flux2_vae(seed=2), build_tiny_flux2_text_encoder(variant, seed=2)
    (hidden, negative), pooled = text.encode(["a photo of sks robot", ""])[0], torch.zeros(0)
    cfg = SampleConfig(steps=3, width=64, height=48, guidance=4.0, seed=9)
    prompts = ValidationPrompts([(hidden, pooled)], cfg, negative=(negative, pooled))
    ours = vae.decode(sample_validation(model, prompts, "cpu"))
    assert FLUX2.real_cfg(model.config) == (variant == "klein")

    noise = torch.randn((1, 128, 3, 4), generator=torch.Generator().manual_seed(cfg.seed))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, time_shift_type="exponential")
    fresh = flux2.build_tiny_flux2_transformer(variant, seed=6)
    pipe_cls = Flux2KleinPipeline if variant == "klein" else Flux2Pipeline
    pipe = pipe_cls(scheduler=scheduler, vae=vae.vae, text_encoder=text.model, tokenizer=text.tokenizer,
                    transformer=fresh)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    extra = {"negative_prompt_embeds": negative[None]} if variant == "klein" else {}
    with torch.no_grad():
        theirs = pipe(prompt_embeds=hidden[None], guidance_scale=cfg.guidance, num_inference_steps=cfg.steps,
                      height=cfg.height, width=cfg.width, latents=noise, output_type="pt", **extra).images
    assert theirs.shape == ours.shape == (1, 3, 48, 64)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    # the comparison can fail: without the guidance (or the LoRA) the images differ
    unguided = vae.decode(sample_validation(model, ValidationPrompts([(hidden, pooled)], dataclasses.replace(
        cfg, guidance=1.0), negative=(negative, pooled)), "cpu"))
    assert not torch.allclose(unguided, theirs, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# The CLI: train --config with FLUX.2 files

@pytest.fixture(scope="module")
def tiny_flux2_folder(tmp_path_factory):
    """``tiny-models --family flux2``: the tiny klein files and their train.toml."""
    from trainer_core.cli import main

    folder = tmp_path_factory.mktemp("flux2") / "models"
    assert main(["tiny-models", str(folder), "--family", "flux2"]) == 0
    return folder


def test_flux2_cli_trains_from_the_tiny_flux2_files(tiny_flux2_folder, tmp_path):
    from safetensors.torch import load_file

    from trainer_core.cli import config_toml, main
    from trainer_core.config import load_run_config

    run = load_run_config(tiny_flux2_folder / "train.toml")
    assert run.model.text_encoder and not (run.model.clip_l or run.model.t5) and run.model.family == "auto"
    run.dataset.resolutions = [64]  # the written recipe at a test's size
    run.train = dataclasses.replace(run.train, steps=3, checkpoint_every=0)
    run.sample = dataclasses.replace(run.sample, steps=2, width=64, height=64,
                                     prompts=["a photo of sks robot on a blue background"])
    run.output.folder = (tmp_path / "out").as_posix()
    assert run.sample.guidance > 1 and run.train.timestep_sampling == "flux_shift"  # klein: CFG; FLUX.2's shift
    config = tmp_path / "short.toml"
    config.write_text(config_toml(run), encoding="utf-8")
    assert main(["train", "--config", str(config), "--device", "cpu"]) == 0

    out = tmp_path / "out"
    state, meta = lora.read_lora_file(out / "tiny_lora.safetensors")
    assert meta["modelspec.architecture"] == "flux-2-klein/lora"
    assert meta["base_model"] == "flux2-klein-tiny.safetensors" and int(meta["steps"]) == 3
    assert any(".attn.to_qkv_mlp_proj.lora_A" in k for k in state) and not any(k.endswith(".alpha") for k in state)
    assert (out / "samples.png").is_file() and (out / "loss.png").is_file()
    latents = sorted((out / "cache" / "latents").glob("*.safetensors"))
    assert len(latents) == 8 and load_file(str(latents[0]))["latent"].shape == (128, 4, 4)
    texts = list((out / "cache" / "text").glob("*.safetensors"))
    assert len(texts) == 9  # the 8 captions (the prompt is one of them) and the empty negative prompt
    assert {load_file(str(p))["hidden"].shape for p in texts} == {(96, 48)}


def test_flux2_cli_refuses_encoders_of_the_other_family(tiny_flux2_folder, tiny_model_files, tmp_path, capsys):
    from trainer_core.cli import main

    flux1_file = tiny_model_files.folder / "flux.safetensors"
    flux2_file = tiny_flux2_folder / "flux2-klein-tiny.safetensors"
    cases = {
        # a FLUX.1 transformer with FLUX.2's text encoder
        f'[model]\ntransformer = "{flux1_file.as_posix()}"\nvae = "{(tiny_model_files.folder / "vae").as_posix()}"\n'
        f'text_encoder = "{(tiny_flux2_folder / "qwen3-tiny.safetensors").as_posix()}"\n':
            r"\[model\] text_encoder: .* is a FLUX\.2 text encoder setting, but transformer .*flux\.safetensors' "
            r"is a FLUX\.1 transformer\. FLUX\.1 takes vae, clip_l, t5",
        # a FLUX.2 transformer with FLUX.1's CLIP-L and T5
        tiny_model_files.model_section(flux2_file):
            r"\[model\] clip_l: .* is a FLUX\.1 text encoder setting, but transformer .*flux2-klein-tiny\.safetensors' "
            r"is a FLUX\.2 transformer\. FLUX\.2 takes vae, text_encoder",
        # a family named that the weights contradict
        f'[model]\ntransformer = "{flux2_file.as_posix()}"\nfamily = "flux1"\n':
            r"\[model\] family: 'flux1' \(FLUX\.1\), but transformer .* is a FLUX\.2 transformer",
    }
    for i, (model_section, message) in enumerate(cases.items()):
        config = tmp_path / f"c{i}.toml"
        config.write_text(model_section + f'[dataset]\nfolder = "{tmp_path.as_posix()}"\n', encoding="utf-8")
        assert main(["train", "--config", str(config), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err


def test_flux2_cache_from_its_encoders_and_masked_loss_at_its_latent_resolution(tmp_path, monkeypatch):
    """Images and captions go through the FLUX.2 VAE and Qwen3 into the cache; a loss mask (cached per 8×8 pixel
    cell) weights each 16×16 latent cell by its mean."""
    from trainer_core.data.cache import build_cache
    from trainer_core.data.dataset import dataset_from_images
    from trainer_core.models.flux2_encoders import build_tiny_flux2_text_encoder, build_tiny_flux2_vae

    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :24] = 1  # 1.5 latent cells wide: the middle column of cells is half weighted
    items = dataset_from_images(images, ["a robot", "a cube"],
                                DatasetConfig(resolutions=[64], masked_loss=True), masks=masks)
    vae = build_tiny_flux2_vae(seed=1)
    cache = build_cache(items, vae, build_tiny_flux2_text_encoder("klein", seed=1), tmp_path / "cache")
    assert torch.allclose(cache.latent(0), vae.encode(items[0].load_pixels()[None])[0])
    assert cache.text(0)[0].shape[1] == 48 and cache.text(0)[1].shape == (0,)
    # fully cached: no encoder needed the second time, the FLUX.2 layout is recognised
    assert build_cache(items, None, None, tmp_path / "cache").reused == 4

    seen = []
    original = flow.elementwise_loss
    monkeypatch.setattr(flow, "elementwise_loss", lambda p, t, *a: seen.append((p.detach(), t)) or original(p, t, *a))
    session = TrainingSession(flux2.build_tiny_flux2_transformer("klein"), cache, LoraConfig(rank=2),
                              TrainConfig(steps=1, compute_dtype="fp32", batch_size=2, checkpoint_every=0),
                              device="cpu")
    loss = session.step()
    err = (seen[0][0] - seen[0][1]) ** 2  # [2, 128, 4, 4]
    order = session.order.batch(0)
    weights = torch.stack([torch.nn.functional.avg_pool2d(masks[i][None], 16) for i in order]).expand_as(err)
    assert loss == pytest.approx(((err * weights).sum() / weights.sum()).item(), rel=1e-5)
    assert abs(loss - err.mean().item()) > 1e-3  # the unweighted mean would differ


def test_flux2_text_encoder_lora_is_refused_before_anything_is_cached(tiny_flux2_folder, tmp_path, capsys):
    """FLUX.2's Qwen3 / Mistral take no LoRA here: the config is refused at once, not after minutes of caching."""
    from trainer_core.cli import main

    config = tmp_path / "te.toml"
    written = (tiny_flux2_folder / "train.toml").read_text(encoding="utf-8")
    assert "[lora]" not in written  # the tiny recipe keeps the default LoRA settings
    config.write_text(written + '\n[lora]\ntext_encoders = "t5"\n', encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "lora.text_encoders = 't5' is not available for FLUX.2" in err and "set text_encoders to 'none'" in err
    assert not out.exists()  # nothing cached or written


def _edit_pairs(root):
    """Two edit pairs at 64 px: targets with their instruction captions, controls under the same stems."""
    from PIL import Image

    target_dir, control_dir = root / "targets", root / "controls"
    target_dir.mkdir()
    control_dir.mkdir()
    for i, stem in enumerate(("a", "b")):
        Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(target_dir / f"{stem}.png")
        (target_dir / f"{stem}.txt").write_text(f"make {stem} blue")
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(control_dir / f"{stem}.png")
    return target_dir, control_dir


def _edit_config(tiny_flux2_folder, tmp_path, target_dir, control_dir):
    from trainer_core.cli import config_toml
    from trainer_core.config import load_run_config

    run = load_run_config(tiny_flux2_folder / "train.toml")
    run.dataset = dataclasses.replace(run.dataset, folder=target_dir.as_posix(), control_folder=control_dir.as_posix(),
                                      resolutions=[64])
    run.train = dataclasses.replace(run.train, steps=2, checkpoint_every=0)
    run.sample = dataclasses.replace(run.sample, steps=2, width=64, height=64, prompts=["make b blue"])
    run.output.folder, run.output.name = (tmp_path / "out").as_posix(), "edit"
    config = tmp_path / "edit.toml"
    config.write_text(config_toml(run), encoding="utf-8")
    return run, config


def test_flux2_edit_cli_trains_paired_and_validates_with_the_control(tiny_flux2_folder, tmp_path, monkeypatch):
    """``[dataset] control_folder`` on the tiny FLUX.2 files: the CLI trains on the pairs (each step sees the batch's
    control latents), saves an edit LoRA, and every validation sample (the loop's and samples.png's) is conditioned
    on the control of the training pair the prompt captions, at real CFG against the negative prompt."""
    from trainer_core.cli import main
    from trainer_core.data.cache import build_cache
    from trainer_core.data.dataset import scan_dataset

    target_dir, control_dir = _edit_pairs(tmp_path)
    run, config = _edit_config(tiny_flux2_folder, tmp_path, target_dir, control_dir)
    trained, sampled = [], []
    real_loss, real_sample = flow.flow_matching_loss, flow.euler_sample

    def recording_loss(*args, references=(), **kwargs):
        trained.append([r.clone() for r in references])
        return real_loss(*args, references=references, **kwargs)

    def recording_sample(*args, references=(), negative=None, **kwargs):
        sampled.append(([r.clone() for r in references], negative))
        return real_sample(*args, references=references, negative=negative, **kwargs)

    monkeypatch.setattr(flow, "flow_matching_loss", recording_loss)
    monkeypatch.setattr(flow, "euler_sample", recording_sample)
    assert main(["train", "--config", str(config), "--device", "cpu"]) == 0

    out = tmp_path / "out"
    state, meta = lora.read_lora_file(out / "edit.safetensors")
    assert meta["modelspec.architecture"] == "flux-2-klein/lora" and meta["reference_images"] == "1"
    assert meta["steps"] == "2" and any(".attn.to_qkv_mlp_proj.lora_A" in k for k in state)
    assert (out / "samples.png").is_file()
    # the cache holds both targets and both controls, FLUX.2 latents [128, 4, 4]; read back without encoders
    cache = build_cache(scan_dataset(run.dataset), None, None, out / "cache")
    assert cache.encoded == 0 and len(list((out / "cache" / "latents").iterdir())) == 4
    assert len(trained) == 2 and all(len(refs) == 1 and refs[0].shape[1:] == (128, 4, 4) for refs in trained)
    control_b = cache.controls(cache.captions.index("make b blue"))[0]
    assert not torch.equal(control_b, cache.controls(cache.captions.index("make a blue"))[0])
    # the loop's final sample, then samples.png's base and LoRA rows: each with pair b's control, guided by CFG
    assert len(sampled) == 3
    for references, negative in sampled:
        assert len(references) == 1 and torch.equal(references[0], control_b[None].float())
        assert negative is not None


def test_flux2_edit_cli_reports_a_bad_pair_before_loading_any_encoder(tiny_flux2_folder, tmp_path, capsys,
                                                                     monkeypatch):
    """A target without its control, or a control without its target, is reported in one line naming the file
    before the VAE or the text encoder is read (minutes with real files), and nothing is written."""
    from trainer_core.cli import main

    loaded = []
    for name in ("load_vae", "load_text_encoder", "load_transformer"):
        real = getattr(FLUX2, name)
        monkeypatch.setattr(FLUX2, name, lambda *a, _real=real, _name=name, **k: loaded.append(_name) or _real(*a, **k))
    target_dir, control_dir = _edit_pairs(tmp_path)
    _, config = _edit_config(tiny_flux2_folder, tmp_path, target_dir, control_dir)
    (control_dir / "b.png").rename(control_dir / "c.png")  # b loses its control; c has no target
    assert main(["train", "--config", str(config), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: dataset: control image '.*c\.png' has no target image of the same name", err), err
    (control_dir / "c.png").unlink()
    assert main(["train", "--config", str(config), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: dataset: target image '.*b\.png' has no control image", err), err
    assert loaded == [] and not (tmp_path / "out").exists()
