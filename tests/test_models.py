"""Model loading: the FLUX.1 transformer from BFL files, folders and dicts; VAE and text encoders from files;
the tiny models."""

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from trainer_core.errors import TrainerInputError
from trainer_core.models import encoders, flux, tiny
from trainer_core.models.encoders import DiffusersVAE, load_text_encoders, load_tokenizer, load_vae
from trainer_core.models.flux import bfl_to_diffusers, diffusers_to_bfl, load_flux_transformer


def velocity(model, dtype=torch.float32):
    """The model's prediction on fixed inputs: 4×4 image tokens, 5 text tokens."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, cfg.in_channels, generator=g)
    hidden = torch.randn(1, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    img_ids = torch.tensor([[0.0, i, j] for i in range(4) for j in range(4)])
    with torch.no_grad():
        return model(hidden_states=x.to(dtype), encoder_hidden_states=hidden.to(dtype),
                     pooled_projections=pooled.to(dtype), timestep=torch.tensor([0.4], dtype=dtype),
                     img_ids=img_ids, txt_ids=torch.zeros(5, 3),
                     guidance=torch.tensor([1.0], dtype=dtype) if cfg.guidance_embeds else None).sample.float()


def assert_same_weights(model, expected: dict):
    sd = model.state_dict()
    assert sd.keys() == expected.keys()
    for key, value in expected.items():
        assert sd[key].dtype == value.dtype and torch.equal(sd[key], value), key


def public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def save(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def source():
    model = tiny.build_tiny_transformer(seed=3, prior_init=False)  # every tensor random: conversion shows
    return model, {k: v.clone() for k, v in model.state_dict().items()}


# --- configs and key mapping ------------------------------------------------------------------------------------

def test_shipped_configs_describe_flux1_dev_and_schnell():
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    dev, schnell = flux.flux_config("flux1-dev"), flux.flux_config("flux1-schnell")
    assert dev["guidance_embeds"] and not schnell["guidance_embeds"]
    assert {k: v for k, v in dev.items() if k != "guidance_embeds"} == \
           {k: v for k, v in schnell.items() if k != "guidance_embeds"}
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(dev)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 1) == 11.9
    dev["num_layers"] = 1
    assert flux.flux_config("flux1-dev")["num_layers"] == 19  # callers get a copy
    with pytest.raises(TrainerInputError, match="flux1-dev"):
        flux.flux_config("flux2")


def test_full_size_mapping_matches_the_published_layout_and_diffusers_converter():
    """At FLUX.1-dev size (meta tensors: shapes only), our BFL layout is the one in flux1-dev.safetensors and
    diffusers' own (width-3072-only) converter maps it to the same diffusers keys and shapes."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(flux.flux_config("flux1-dev"))
    sd = model.state_dict()
    bfl = diffusers_to_bfl(sd)
    published = {  # shapes as in Black Forest Labs' flux1-dev.safetensors
        "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.in_layer.weight": (3072, 256), "double_blocks.18.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.0.txt_mod.lin.weight": (18432, 3072), "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "single_blocks.37.linear1.weight": (21504, 3072), "single_blocks.37.linear2.weight": (3072, 15360),
        "single_blocks.0.modulation.lin.weight": (9216, 3072), "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    }
    assert {k: tuple(bfl[k].shape) for k in published} == published
    stock = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: tuple(v.shape) for k, v in stock.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    converted, config = bfl_to_diffusers(bfl)
    assert converted.keys() == sd.keys()
    assert config == flux.flux_config("flux1-dev")
    del bfl["guidance_in.in_layer.weight"], bfl["guidance_in.in_layer.bias"], bfl["guidance_in.out_layer.weight"]
    del bfl["guidance_in.out_layer.bias"]
    assert bfl_to_diffusers(bfl)[1] == flux.flux_config("flux1-schnell")


def test_conversion_round_trips_and_final_layer_halves_are_swapped(source):
    _, sd = source
    bfl = diffusers_to_bfl(sd)
    assert not any(k.startswith(("transformer_blocks", "x_embedder")) for k in bfl)
    shift, scale = bfl["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(torch.cat([scale, shift]), sd["norm_out.linear.weight"])
    back, config = bfl_to_diffusers(bfl)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert config == {"_class_name": "FluxTransformer2DModel", **tiny.tiny_flux_config()}


def test_module_mapping_names_the_rows_of_fused_weights(source):
    _, sd = source
    bfl = diffusers_to_bfl(sd)
    assert flux.diffusers_module_to_bfl("transformer_blocks.3.attn.to_k") == ("double_blocks.3.img_attn.qkv",
                                                                           slice(3072, 6144))
    assert flux.diffusers_module_to_bfl("single_transformer_blocks.0.proj_mlp") == ("single_blocks.0.linear1",
                                                                                 slice(9216, 21504))
    assert flux.diffusers_module_to_bfl("transformer_blocks.0.ff.net.2") == ("double_blocks.0.img_mlp.2", None)
    modules = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight") and not k.startswith("norm_out")}
    config = tiny.tiny_flux_config()
    model_width = config["num_attention_heads"] * config["attention_head_dim"]
    for module in modules:  # every tiny module's weight is exactly those rows of the BFL tensor
        bfl_module, rows = flux.diffusers_module_to_bfl(module, inner_dim=model_width)
        fused = bfl[bfl_module + (".scale" if re.search(r"norm_(added_)?[qk]$", module) else ".weight")]
        assert torch.equal(fused if rows is None else fused[rows], sd[module + ".weight"]), module
    for bad in ("norm_out.linear", "transformer_blocks.0.attn.nonsense", "unet.conv_in"):
        with pytest.raises(ValueError):
            flux.diffusers_module_to_bfl(bad)


# --- loading the transformer --------------------------------------------------------------------------------------

def test_bfl_file_loads_to_the_same_model(source, tmp_path):
    model, sd = source
    path = save(diffusers_to_bfl(sd), tmp_path / "flux-tiny.safetensors")
    loaded = load_flux_transformer(path, dtype=torch.float32)
    assert_same_weights(loaded, sd)
    assert public(loaded.config) == public(model.config)
    assert torch.equal(velocity(loaded), velocity(model))


def test_comfyui_style_files_load_fp8_bf16_and_prefixed(source, tmp_path):
    _, sd = source
    bfl = diffusers_to_bfl(sd)
    prefixed = {flux.BFL_PREFIX + k: v.to(torch.float8_e4m3fn) for k, v in bfl.items()}
    prefixed["vae.decoder.conv_in.weight"] = torch.zeros(2)  # all-in-one checkpoints carry other models too
    loaded = load_flux_transformer(save(prefixed, tmp_path / "fp8.safetensors"))  # default dtype bf16
    assert_same_weights(loaded, {k: v.to(torch.float8_e4m3fn).to(torch.bfloat16) for k, v in sd.items()})
    half = load_flux_transformer(save({k: v.half() for k, v in bfl.items()}, tmp_path / "fp16.safetensors"))
    assert_same_weights(half, {k: v.half().to(torch.bfloat16) for k, v in sd.items()})
    assert (velocity(half, torch.bfloat16) - velocity(source[0])).abs().max() < 0.05


def test_scaled_fp8_weights_are_dequantised(source, tmp_path):
    _, sd = source
    quantised, dequantised = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in diffusers_to_bfl(sd).items():
        if key.endswith(".weight") and value.dim() == 2:
            scale = value.abs().max() / 448
            quantised[key] = (value / scale).to(torch.float8_e4m3fn)
            quantised[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
            dequantised[key] = quantised[key].float() * scale
        else:
            quantised[key] = dequantised[key] = value
    loaded = load_flux_transformer(save({flux.BFL_PREFIX + k: v for k, v in quantised.items()},
                                        tmp_path / "scaled.safetensors"), dtype=torch.float32)
    expected, _ = bfl_to_diffusers(dequantised)
    assert_same_weights(loaded, {k: v.float() for k, v in expected.items()})
    # per-tensor scaling keeps the weights close to the originals (unscaled fp8 would flush small ones to zero)
    assert max((loaded.state_dict()[k] - v).abs().max() / v.abs().max() for k, v in sd.items()) < 0.07


def test_schnell_layout_state_dicts_and_diffusers_files(source, tmp_path):
    model, sd = source
    bfl = {k: v for k, v in diffusers_to_bfl(sd).items() if not k.startswith("guidance_in")}
    schnell = load_flux_transformer(bfl, dtype=torch.float32)
    assert schnell.config.guidance_embeds is False
    from_dict = load_flux_transformer(sd, dtype=torch.float32)  # diffusers keys in memory
    assert_same_weights(from_dict, sd)
    from_file = load_flux_transformer(save(sd, tmp_path / "diffusers-keys.safetensors"), dtype=torch.float32)
    assert_same_weights(from_file, sd)
    # identical weights; mmap'd tensors sit at other alignments, so CPU kernels may round the last bit differently
    torch.testing.assert_close(velocity(from_file), velocity(model), rtol=0, atol=1e-5)


def test_diffusers_folder_and_pipeline_folder(source, tmp_path):
    model, sd = source
    model.save_pretrained(tmp_path / "pipeline" / "transformer")
    for folder in (tmp_path / "pipeline" / "transformer", tmp_path / "pipeline"):
        loaded = load_flux_transformer(folder, dtype=torch.float32)
        assert_same_weights(loaded, sd)
    assert load_flux_transformer(tmp_path / "pipeline").dtype == torch.bfloat16


def test_bad_transformer_inputs_are_named_with_a_fix(source, tmp_path):
    _, sd = source
    with pytest.raises(TrainerInputError, match=r"not found: .*nowhere\.safetensors"):
        load_flux_transformer(tmp_path / "nowhere.safetensors")
    vae_like = save({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, tmp_path / "ae.safetensors")
    with pytest.raises(TrainerInputError, match="ae.safetensors is not a FLUX.1 transformer: it looks like a VAE"):
        load_flux_transformer(vae_like)
    bfl = diffusers_to_bfl(sd)
    del bfl["double_blocks.1.img_attn.qkv.weight"]
    with pytest.raises(TrainerInputError, match=r"incomplete FLUX.1 transformer: 1 tensors are missing, e\.g\. "
                                                r"double_blocks\.1\.img_attn\.qkv\.weight"):
        load_flux_transformer(save(bfl, tmp_path / "partial.safetensors"))
    data = save(diffusers_to_bfl(sd), tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainerInputError, match="cut.safetensors is not a readable safetensors file.*download"):
        load_flux_transformer(tmp_path / "cut.safetensors")
    (tmp_path / "flux.ckpt").write_bytes(b"pickle")
    with pytest.raises(TrainerInputError, match="only .safetensors"):
        load_flux_transformer(tmp_path / "flux.ckpt")
    (tmp_path / "vae_dir").mkdir()
    (tmp_path / "vae_dir" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(TrainerInputError, match="AutoencoderKL, not a FLUX.1 transformer"):
        load_flux_transformer(tmp_path / "vae_dir")


# --- VAE --------------------------------------------------------------------------------------------------------

def test_model_space_is_flux_shift_and_scale():
    z = torch.randn(2, 16, 4, 4)
    assert torch.allclose(encoders.to_model_space(z), (z - 0.1159) * 0.3611)
    assert torch.allclose(encoders.from_model_space(encoders.to_model_space(z)), z, atol=1e-6)


def test_tiny_vae_encodes_to_flux_latents_and_decodes_to_pooled_image():
    vae = tiny.build_tiny_vae(seed=0)
    images = torch.rand(2, 3, 64, 48)
    latents = vae.encode(images)
    assert latents.shape == (2, 16, 8, 6)
    decoded = vae.decode(latents)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    pooled = F.interpolate(F.avg_pool2d(images, 8), scale_factor=8, mode="nearest")
    assert (decoded - pooled).abs().max() < 1e-3  # the tiny VAE is an exact 8×8 pooling codec
    flat = vae.encode(torch.full((1, 3, 16, 16), 0.5))
    assert flat.std() < 1e-4  # uniform grey → one latent everywhere


def test_vae_identity_follows_the_weights():
    vae = tiny.build_tiny_vae(seed=0)
    assert vae.identity == tiny.build_tiny_vae(seed=0).identity
    assert vae.identity != tiny.build_tiny_vae(seed=1).identity
    changed = tiny.build_tiny_vae(seed=0)
    with torch.no_grad():
        changed.vae.decoder.conv_out.weight.mul_(1.01)
    assert DiffusersVAE(changed.vae).identity != vae.identity


def small_vae(latent_channels=16, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=0.3611, shift_factor=0.1159).eval()


def to_ldm(sd, levels):
    """diffusers AutoencoderKL keys → the LDM/BFL layout of ae.safetensors (test fixture)."""
    out = {}
    for key, value in sd.items():
        key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
        key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
        key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", key)
        key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", key)
        key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
        key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in key:
            key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
                key = key.replace(f".{new}.", f".{old}.")
            value = value[:, :, None, None] if value.dim() == 2 else value  # 1×1 convs in the original
        out[key] = value
    return out


def test_vae_loads_from_bfl_file_and_diffusers_folder(tmp_path):
    source = small_vae()
    images = torch.rand(1, 3, 32, 32)
    expected = DiffusersVAE(source).encode(images)
    path = save(to_ldm(source.state_dict(), levels=2), tmp_path / "ae.safetensors")
    from_file = load_vae(path, dtype=torch.float32)
    assert_same_weights(from_file.vae, source.state_dict())
    assert torch.equal(from_file.encode(images), expected)
    source.save_pretrained(tmp_path / "flux" / "vae")
    from_folder = load_vae(tmp_path / "flux", dtype=torch.float32)
    assert torch.equal(from_folder.encode(images), expected)
    assert from_folder.identity == from_file.identity


def test_vae_with_wrong_latent_channels_is_refused(tmp_path):
    sdxl_like = small_vae(latent_channels=4)
    with pytest.raises(TrainerInputError, match="4 latent channels; FLUX.1 needs its own 16-channel VAE"):
        DiffusersVAE(sdxl_like)
    with pytest.raises(TrainerInputError, match="sdxl_vae.safetensors has 4 latent channels"):
        load_vae(save(to_ldm(sdxl_like.state_dict(), levels=2), tmp_path / "sdxl_vae.safetensors"))
    sdxl_like.save_pretrained(tmp_path / "sdxl_vae")
    with pytest.raises(TrainerInputError, match="4 latent channels"):
        load_vae(tmp_path / "sdxl_vae")
    with pytest.raises(TrainerInputError, match="not found"):
        load_vae(tmp_path / "missing_ae.safetensors")


# --- text encoders --------------------------------------------------------------------------------------------------

def test_tiny_text_encoder_matches_the_tiny_transformer():
    text = tiny.build_tiny_text_encoder(seed=0)
    hidden, pooled = text.encode(["a red robot", "a blue robot on green grass"])
    cfg = tiny.tiny_flux_config()
    assert hidden.shape == (2, tiny.TINY_T5_MAX_LENGTH, cfg["joint_attention_dim"])
    assert pooled.shape == (2, cfg["pooled_projection_dim"])
    assert not torch.allclose(hidden[0], hidden[1]) and not torch.allclose(pooled[0], pooled[1])
    again, _ = text.encode(["a red robot"])
    assert torch.equal(again[0], hidden[0])  # a caption's encoding does not depend on its batch


def test_text_encoder_identity_follows_weights_and_length():
    text = tiny.build_tiny_text_encoder(seed=0)
    assert text.identity == tiny.build_tiny_text_encoder(seed=0).identity
    assert text.identity != tiny.build_tiny_text_encoder(seed=1).identity
    shorter = encoders.FluxTextEncoder(text.clip_model, text.clip_tokenizer, text.t5_model, text.t5_tokenizer, 8)
    assert shorter.identity != text.identity


def test_text_encoders_and_tokenizers_load_from_disk(tmp_path):
    text = tiny.build_tiny_text_encoder(seed=0)
    text.clip_model.save_pretrained(tmp_path / "flux" / "text_encoder")
    text.t5_model.save_pretrained(tmp_path / "flux" / "text_encoder_2")
    text.clip_tokenizer.save_pretrained(tmp_path / "tokenizers" / "clip")
    text.t5_tokenizer.save_pretrained(tmp_path / "tokenizers" / "t5")
    captions = ["a red robot, waving", "night sky"]
    loaded = load_text_encoders(tmp_path / "flux" / "text_encoder", tmp_path / "flux" / "text_encoder_2",
                                tokenizer_dir=tmp_path / "tokenizers", t5_max_length=tiny.TINY_T5_MAX_LENGTH)
    for ours, theirs in zip(loaded.encode(captions), text.encode(captions)):
        assert torch.equal(ours, theirs)
    assert loaded.identity == text.identity
    # diffusers layout: tokenizer/ and tokenizer_2/ beside text_encoder/ are found without a tokenizer folder
    text.clip_tokenizer.save_pretrained(tmp_path / "flux" / "tokenizer")
    text.t5_tokenizer.save_pretrained(tmp_path / "flux" / "tokenizer_2")
    assert load_tokenizer("t5", tmp_path / "flux" / "text_encoder_2")("robot").input_ids == \
           text.t5_tokenizer("robot").input_ids


def test_text_encoders_load_from_comfyui_style_single_files(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    text = tiny.build_tiny_text_encoder(seed=0)
    torch.manual_seed(0)  # file CLIPs are read with head dim 64 (every CLIP's), so this one is 64 wide
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(text.clip_tokenizer), hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=77,
                                        eos_token_id=text.clip_tokenizer.eos_token_id)).eval()
    folder = tmp_path / "text_encoders"
    folder.mkdir()
    save({"text_model." + k: v for k, v in clip.state_dict().items()} | {"logit_scale": torch.ones(())},
         folder / "clip_l.safetensors")
    t5_sd = {k: v.to(torch.float8_e4m3fn) for k, v in text.t5_model.state_dict().items()
             if k != "encoder.embed_tokens.weight"}  # ComfyUI's T5 files carry only shared.weight
    save(t5_sd, folder / "t5xxl_fp8_e4m3fn.safetensors")
    text.clip_tokenizer.save_pretrained(folder / "clip")
    text.t5_tokenizer.save_pretrained(folder / "t5")
    loaded = load_text_encoders(folder / "clip_l.safetensors", folder / "t5xxl_fp8_e4m3fn.safetensors",
                                t5_max_length=tiny.TINY_T5_MAX_LENGTH)  # tokenizers found beside the files
    assert_same_weights(loaded.clip_model, clip.state_dict())
    assert torch.equal(loaded.t5_model.encoder.embed_tokens.weight, t5_sd["shared.weight"].float())
    t5_rounded = T5EncoderModel(text.t5_model.config).eval()  # the original T5 with the file's fp8 rounding
    t5_rounded.load_state_dict({k: v.to(torch.float8_e4m3fn).float() for k, v in text.t5_model.state_dict().items()})
    reference = encoders.FluxTextEncoder(clip, text.clip_tokenizer, t5_rounded, text.t5_tokenizer,
                                         tiny.TINY_T5_MAX_LENGTH)
    for ours, theirs in zip(loaded.encode(["a robot", "grass"]), reference.encode(["a robot", "grass"])):
        assert torch.equal(ours, theirs)


def test_missing_text_encoder_files_are_named(tmp_path):
    text = tiny.build_tiny_text_encoder(seed=0)
    text.clip_model.save_pretrained(tmp_path / "clip_model")
    text.t5_model.save_pretrained(tmp_path / "t5_model")
    with pytest.raises(TrainerInputError, match=r"T5-XXL text encoder not found: .*t5xxl_fp16\.safetensors"):
        load_text_encoders(tmp_path / "clip_model", tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(TrainerInputError, match=r"No CLIP-L tokenizer found .*vocab\.json \+ merges\.txt.*looked in"):
        load_text_encoders(tmp_path / "clip_model", tmp_path / "t5_model")
    with pytest.raises(TrainerInputError, match="tokenizer folder not found"):
        load_text_encoders(tmp_path / "clip_model", tmp_path / "t5_model", tokenizer_dir=tmp_path / "nope")
    text.t5_tokenizer.save_pretrained(tmp_path / "tok" / "clip")  # swapped
    text.clip_tokenizer.save_pretrained(tmp_path / "tok" / "t5")
    with pytest.raises(TrainerInputError, match=r"tok/clip holds a Unigram tokenizer, not CLIP-L's BPE"):
        load_text_encoders(tmp_path / "clip_model", tmp_path / "t5_model", tokenizer_dir=tmp_path / "tok")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(TrainerInputError, match="bad.safetensors is not a CLIP-L text encoder"):
        encoders.load_text_encoder("clip", tmp_path / "bad.safetensors", torch.float32)


def test_fingerprint_handles_tensors_larger_than_float32_indexing():
    """CLIP-L's token embedding (49408 × 768) has more elements than float32 can index exactly."""
    from trainer_core.models.encoders import weights_fingerprint

    embedding = torch.nn.Embedding(49408, 768)
    first = weights_fingerprint(embedding)
    with torch.no_grad():
        embedding.weight[-1, -1] += 1.0  # the very last element is sampled
    assert weights_fingerprint(embedding) != first


# --- wrong or incomplete model folders ----------------------------------------------------------------------------

def _drop_tensor(weights_file, fragment: str) -> str:
    from safetensors.torch import load_file

    tensors = load_file(str(weights_file))
    key = next(k for k in sorted(tensors) if fragment in k)
    del tensors[key]
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    return key


def test_wrong_or_incomplete_model_folders_are_refused_never_random(source, tmp_path):
    """A CLIP-L folder given as T5, or a folder whose weights lack tensors, would load as a partly random model
    (transformers and diffusers only log it): each is refused naming what is missing."""
    text = tiny.build_tiny_text_encoder(seed=0)
    text.clip_model.save_pretrained(tmp_path / "clip_l")
    text.t5_model.save_pretrained(tmp_path / "t5")
    with pytest.raises(TrainerInputError, match=r"clip_l holds a 'clip_text_model' model, not the T5-XXL"):
        encoders.load_text_encoder("t5", tmp_path / "clip_l", torch.float32)
    missing = _drop_tensor(tmp_path / "t5" / "model.safetensors", "SelfAttention.q.weight")
    with pytest.raises(TrainerInputError, match=rf"lack 1 of the model's tensors \(e\.g\. {re.escape(missing)}\)"):
        encoders.load_text_encoder("t5", tmp_path / "t5", torch.float32)

    vae = small_vae()
    vae.save_pretrained(tmp_path / "vae")
    missing = _drop_tensor(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", "decoder.conv_out")
    with pytest.raises(TrainerInputError, match=rf"VAE weights lack 1 .*{re.escape(missing)}"):
        load_vae(tmp_path / "vae", dtype=torch.float32)

    model, _ = source
    model.save_pretrained(tmp_path / "transformer")
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    missing = _drop_tensor(weights, "proj_out")
    with pytest.raises(TrainerInputError, match=rf"lack 1 tensors \(e\.g\. {re.escape(missing)}\)"):
        load_flux_transformer(tmp_path / "transformer", dtype=torch.float32)
    weights.unlink()
    with pytest.raises(TrainerInputError, match="config.json but no .safetensors weights"):
        flux.check_flux_transformer(tmp_path / "transformer")


def test_transformer_family_is_read_from_the_header_alone(source, tmp_path):
    """check_flux_transformer answers from the file's header (the CLI calls it before caching): a VAE is named
    as one, a real FLUX.1 file passes."""
    _, sd = source
    flux.check_flux_transformer(save(diffusers_to_bfl(sd), tmp_path / "flux.safetensors"))
    vae_file = save(to_ldm(small_vae().state_dict(), levels=2), tmp_path / "ae.safetensors")
    with pytest.raises(TrainerInputError, match="ae.safetensors is not a FLUX.1 transformer: it looks like a VAE"):
        flux.check_flux_transformer(vae_file)
