"""Tiny offline models with FLUX.1's architecture and interfaces, for the demo and the tests.

Everything is built in memory from a seed in well under a second: a FluxTransformer2DModel a few hundred
thousand parameters big, an AutoencoderKL with 16 latent channels and 8× downsampling, and CLIP/T5 text encoders
whose widths match the tiny transformer, with tokenizers built from fixed vocabularies (no files, no hub).
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import torch

from .encoders import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, LATENT_CHANNELS, DiffusersVAE, FluxTextEncoder

TINY_T5_MAX_LENGTH = 64  # the tokenizer is per character: 64 covers the bundled captions, so they stay distinct


def tiny_flux_config() -> dict:
    """diffusers FluxTransformer2DModel config: FLUX.1-dev's layout at width 64 (4 heads of 16).

    Width 64 equals the packed token width (16 channels × 2×2), so the skip path can carry a token unchanged.
    """
    return {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": [4, 4, 8],
    }


def build_tiny_transformer(seed: int = 0, prior_init: bool = True, **overrides):
    """A tiny fp32 FLUX transformer from ``seed``; ``overrides`` change config fields.

    With ``prior_init`` it starts where a trained flow model's skip path would: it predicts v = x_t, i.e. the
    clean image 0 (the data mean), and each block adds a small gated update. A fully random model instead
    predicts noise-scaled garbage that a LoRA — which cannot touch the input/output layers or the modulation —
    spends its whole budget undoing, so nothing it learns would be visible in samples.
    """
    from diffusers import FluxTransformer2DModel

    config = {**tiny_flux_config(), **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**config).eval()
        if prior_init:
            _init_as_prior(model)
    return model


_BLOCK_GATE = 0.1  # residual gate of every block: small updates on top of the skip path


@torch.no_grad()
def _init_as_prior(model) -> None:
    width = model.config.num_attention_heads * model.config.attention_head_dim
    channels = model.config.in_channels
    if width < channels:
        raise ValueError(f"prior_init needs width ≥ {channels} (the token width), got {width}")
    # x_embedder embeds tokens orthonormally and proj_out reads them back: proj_out ∘ x_embedder = identity
    basis, _ = torch.linalg.qr(torch.randn(width, channels))
    model.x_embedder.weight.copy_(basis)
    model.x_embedder.bias.zero_()
    model.proj_out.weight.copy_(basis.T)
    model.proj_out.bias.zero_()
    model.norm_out.linear.weight.zero_()  # final adaptive norm: plain LayerNorm (scale = shift = 0)
    model.norm_out.linear.bias.zero_()
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        norms = [block.norm1, block.norm1_context] if hasattr(block, "norm1") else [block.norm]
        for norm in norms:
            # AdaLayerNormZero: chunks (shift, scale, gate[, shift, scale, gate]); constant modulation, gate 0.1
            norm.linear.weight.zero_()
            bias = norm.linear.bias.view(-1, width)
            bias.zero_()
            bias[2::3] = _BLOCK_GATE


# The demo's transformer: an exact flow model of the data mean, with room for a LoRA to add the images.
_CONSTANT_DIMS = 32  # residual-stream dims holding ±K: LayerNorm then divides by a near-constant, i.e. acts linearly
_K = 16.0
_SIGMA_MIN = 0.02  # the 1/σ output gain is fitted on [0.02, 1]; the sampler's smallest σ > 0 is ≈ 0.08
_RAMPS = 48  # time-embedding units, each a soft ramp in σ


def build_tiny_flow_transformer(seed: int = 0):
    """A tiny FLUX transformer (width 128) that predicts v = x_t / σ — the exact flow of data whose mean is 0 —
    at every σ, and whose blocks add nothing until a LoRA trains them (their output projections start at 0).

    The residual stream stays linear (constant dims keep LayerNorm's divisor fixed), image queries carry a constant
    part (so RoPE gives each position its own attention to the prompt), and the final modulation scales the output
    by 1/σ, read from time-embedding ramps. So a LoRA has one thing to learn — the image a prompt stands for — and
    its samples are that image, not noise (tests/test_demo.py).
    """
    from diffusers import FluxTransformer2DModel

    config = {**tiny_flux_config(), "num_attention_heads": 8}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**config).eval()
    _init_as_mean_flow(model, seed)
    return model


@torch.no_grad()
def _init_as_mean_flow(model, seed: int) -> None:
    cfg = model.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    channels = cfg.in_channels
    signal = width - _CONSTANT_DIMS
    generator = torch.Generator().manual_seed(seed)
    # tokens enter an orthonormal basis orthogonal to the all-ones vector (LayerNorm's mean stays 0)
    q, _ = torch.linalg.qr(torch.cat([torch.ones(signal, 1), torch.randn(signal, channels, generator=generator)], 1))
    embed = torch.zeros(width, channels)
    embed[:signal] = q[:, 1:]
    model.x_embedder.weight.copy_(embed)
    model.x_embedder.bias.zero_()
    model.x_embedder.bias[signal:signal + _CONSTANT_DIMS // 2] = _K
    model.x_embedder.bias[signal + _CONSTANT_DIMS // 2:] = -_K
    model.proj_out.weight.copy_(embed.T)
    model.proj_out.bias.zero_()
    for block in model.transformer_blocks:
        for linear in (block.attn.to_out[0], block.attn.to_add_out, block.ff.net[2], block.ff_context.net[2]):
            linear.weight.zero_()
            linear.bias.zero_()
    for block in model.single_transformer_blocks:
        block.proj_out.weight.zero_()
        block.proj_out.bias.zero_()
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        for norm in [block.norm1, block.norm1_context] if hasattr(block, "norm1") else [block.norm]:
            norm.linear.weight.zero_()  # constant modulation: shift 0, scale 0, gate 1
            bias = norm.linear.bias.view(-1, width)
            bias.zero_()
            bias[2::3] = 1.0
    # time embedding = soft ramps of σ alone (the pooled text and guidance parts are switched off)
    embeddings = model.time_text_embed
    for linear in (embeddings.text_embedder.linear_2, embeddings.guidance_embedder.linear_2):
        linear.weight.zero_()
        linear.bias.zero_()
    knots = torch.logspace(math.log10(_SIGMA_MIN), 0, _RAMPS)
    lowest = math.exp(-math.log(10000) * 127 / 128)  # its sine channel (255) is ≈ 1000·σ·lowest: linear in σ
    slope = 4.0 / knots
    timestep = embeddings.timestep_embedder
    timestep.linear_1.weight.zero_()
    timestep.linear_1.bias.zero_()
    timestep.linear_1.weight[:_RAMPS, 255] = -slope / (1000 * lowest)
    timestep.linear_1.bias[:_RAMPS] = slope * knots
    timestep.linear_2.weight.zero_()
    timestep.linear_2.weight[range(_RAMPS), range(_RAMPS)] = 1.0
    timestep.linear_2.bias.zero_()
    timestep.linear_2.bias[:_RAMPS] = 10.0  # SiLU(x + 10) ≈ x + 10: the final modulation sees the ramps as they are
    # final modulation: scale = (LayerNorm divisor)/σ − 1, least-squares fitted over σ
    divisor = math.sqrt(_CONSTANT_DIMS * _K * _K / width)
    sigma = torch.linspace(_SIGMA_MIN, 1, 2000)
    # The ramps overlap (condition number ≈ 5e8): a plain least-squares fit swings its weights by thousands on
    # last-bit differences (LAPACK's path varies with memory alignment and CPU), so two builds in one process
    # differed. Features in float64 and singular values below 1e-7 dropped give the same fit every time, and a
    # smaller error once the weights are fp32 (2.8e-4 of 1/σ instead of 1.4e-3).
    embeddings.double()
    sigma = sigma.double()
    temb = embeddings(sigma * 1000, torch.full_like(sigma, 1000.0), sigma.new_zeros(len(sigma), cfg.pooled_projection_dim))
    embeddings.float()
    features = torch.cat([torch.nn.functional.silu(temb)[:, :_RAMPS], torch.ones(len(sigma), 1, dtype=sigma.dtype)], 1)
    fit = torch.linalg.lstsq(features, (divisor / sigma - 1)[:, None], rcond=1e-7, driver="gelsd").solution[:, 0].float()
    final = model.norm_out.linear  # rows: scale, then shift
    final.weight.zero_()
    final.bias.zero_()
    final.weight[:width, :_RAMPS] = fit[:_RAMPS]
    final.bias[:width] = fit[_RAMPS]


# ---------------------------------------------------------------------------------------------------------------
# VAE: an exact 8×8 average-pool encoder / nearest-neighbour decoder expressed in AutoencoderKL's own layers, so
# demo images survive encode→decode (as blocky thumbnails) without any training. Widths 32, GroupNorm groups of 4.

_VAE_WIDTH = 32
_GROUP = 4  # channels per GroupNorm group: [x, −x, K, −K] per colour
_GAIN = 2.0  # pixel values in −1..1 have std ≈ 0.5: ×2 gives model-space latents of std ≈ 1, as FLUX's
_K = 32.0  # the constant pair dominates the group variance, so GroupNorm divides by a near-constant σ ≈ K/√2


def _tiny_vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [_VAE_WIDTH] * 4,
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": _VAE_WIDTH // _GROUP,
        "sample_size": 128,
        "scaling_factor": FLUX_VAE_SCALE,
        "shift_factor": FLUX_VAE_SHIFT,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def _identity_residuals(module: torch.nn.Module) -> None:
    """Zero the last layer of every residual branch (resnet conv2, attention out) so each block passes x through."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for block in module.modules():
        if isinstance(block, (ResnetBlock2D, Attention)):
            last = block.conv2 if isinstance(block, ResnetBlock2D) else block.to_out[0]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)


def _centre_tap(conv: torch.nn.Conv2d, matrix: torch.Tensor, bias: torch.Tensor) -> None:
    """Make a 3×3 conv a per-pixel linear map ``matrix`` [out, in] + ``bias``."""
    conv.weight.zero_()
    conv.weight[:, :, 1, 1] = matrix
    conv.bias.copy_(bias)


def _split_into_groups(colours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix, bias) taking 3 values per pixel to the channel layout [c, −c, K, −K] per colour, rest zero.

    GroupNorm then sees mean 0 and variance (c² + K²)/2 ≈ K²/2 in each group, and SiLU(a) − SiLU(−a) = a undoes
    the activation exactly: the normalise → SiLU → conv tail of each half stays (almost exactly) linear.
    """
    matrix = torch.zeros(_VAE_WIDTH, colours.shape[1])
    bias = torch.zeros(_VAE_WIDTH)
    for c in range(3):
        matrix[_GROUP * c] = colours[c]
        matrix[_GROUP * c + 1] = -colours[c]
        bias[_GROUP * c + 2], bias[_GROUP * c + 3] = _K, -_K
    return matrix, bias


def _merge_groups(out_channels: int, mix: torch.Tensor) -> torch.Tensor:
    """Matrix [out, width] reading a colour back as σ·(SiLU(c) − SiLU(−c)) and applying ``mix`` [out, 3]."""
    sigma = math.sqrt((_K**2 + 0.5) / 2)  # 0.5 ≈ mean c² of an image in −1..1; error < 0.1 % over its range
    matrix = torch.zeros(out_channels, _VAE_WIDTH)
    for c in range(3):
        matrix[:, _GROUP * c] = sigma * mix[:, c]
        matrix[:, _GROUP * c + 1] = -sigma * mix[:, c]
    return matrix


@torch.no_grad()
def _make_pool_codec(vae, seed: int) -> None:
    """Model-space latent z = P·avgpool₈(2·image − 1), decode = nearest-upsample(P⁺·z), P a seeded 16×3 map.

    P has orthogonal columns scaled so z has about unit variance per channel for natural images (measured 1.1 on
    the bundled samples), like real FLUX latents.
    """
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(LATENT_CHANNELS, 3, generator=generator))
    gain = _GAIN * math.sqrt(LATENT_CHANNELS / 3)
    p, p_inv = q * gain, q.T / gain
    enc, dec = vae.encoder, vae.decoder
    for part in (enc, dec):
        _identity_residuals(part)

    _centre_tap(enc.conv_in, *_split_into_groups(torch.eye(3)))
    for block in enc.down_blocks:
        if block.downsamplers is not None:  # stride-2 conv → mean of each 2×2 patch, channel by channel
            conv = block.downsamplers[0].conv
            conv.weight.zero_()
            conv.weight[range(_VAE_WIDTH), range(_VAE_WIDTH), :2, :2] = 0.25
            conv.bias.zero_()
    # raw latent = z / scale + shift (mean half of conv_out); the log-variance half is a small constant
    mean = _merge_groups(LATENT_CHANNELS, p / FLUX_VAE_SCALE)
    _centre_tap(enc.conv_out, torch.cat([mean, torch.zeros_like(mean)]),
                torch.cat([torch.full((LATENT_CHANNELS,), FLUX_VAE_SHIFT), torch.full((LATENT_CHANNELS,), -20.0)]))

    # decoder: colours = P⁺·(raw − shift)·scale
    matrix, bias = _split_into_groups(p_inv * FLUX_VAE_SCALE)
    _centre_tap(dec.conv_in, matrix, bias + matrix @ torch.full((LATENT_CHANNELS,), -FLUX_VAE_SHIFT))
    for block in dec.up_blocks:
        if block.upsamplers is not None:  # nearest ×2 followed by an identity conv
            _centre_tap(block.upsamplers[0].conv, torch.eye(_VAE_WIDTH), torch.zeros(_VAE_WIDTH))
    _centre_tap(dec.conv_out, _merge_groups(3, torch.eye(3)), torch.zeros(3))


def build_tiny_vae(seed: int = 0) -> DiffusersVAE:
    """A tiny AutoencoderKL (16 latent channels, 8× downsampling) whose decode inverts encode up to 8×8 pooling."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**_tiny_vae_config())
    _make_pool_codec(vae, seed)
    return DiffusersVAE(vae.eval())


# ---------------------------------------------------------------------------------------------------------------
# Text encoders and tokenizers

def tiny_clip_tokenizer():
    """CLIP's byte-level BPE pipeline with a character vocabulary (no merges): any text tokenises."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5_tokenizer():
    """T5's Unigram pipeline with a vocabulary of printable ASCII characters (others map to <unk>)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)


def build_tiny_text_encoder(seed: int = 0) -> FluxTextEncoder:
    """Tiny CLIP (pooled width 32) + tiny T5 (hidden width 32), matching :func:`tiny_flux_config`, T5 length 16."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    width = tiny_flux_config()
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=width["pooled_projection_dim"], intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id)
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer), d_model=width["joint_attention_dim"], d_kv=16, d_ff=64, num_layers=2,
        num_heads=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(clip_config).eval()
        t5 = T5EncoderModel(t5_config).eval()
    return FluxTextEncoder(clip, clip_tokenizer, t5, t5_tokenizer, TINY_T5_MAX_LENGTH)


# ---------------------------------------------------------------------------------------------------------------
# The tiny models as files, in the formats `train --config` reads (for trying the headless path without FLUX.1)

TINY_MODEL_FILES = {
    "transformer": "flux1-tiny.safetensors",  # BFL keys, as flux1-dev.safetensors
    "transformer_diffusers": "flux1-tiny-diffusers",  # the same weights as a diffusers folder
    "vae": "vae",  # diffusers AutoencoderKL folder
    "clip_l": "clip_l",  # transformers folders
    "t5": "t5",
    "tokenizers": "tokenizers",  # clip/ and t5/
}


def write_tiny_models(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny transformer (BFL file and diffusers folder), VAE, CLIP-L, T5 and tokenizers into ``folder``
    under the names of :data:`TINY_MODEL_FILES`; returns those paths. The libraries' own writers produce the folders,
    so they load exactly as downloaded models do."""
    from ..fileio import save_safetensors
    from .flux import diffusers_to_bfl

    folder = Path(folder)
    paths = {key: folder / name for key, name in TINY_MODEL_FILES.items()}
    transformer = build_tiny_flow_transformer(seed=seed)
    save_safetensors(diffusers_to_bfl(transformer.state_dict()), paths["transformer"])
    transformer.save_pretrained(paths["transformer_diffusers"])
    build_tiny_vae(seed=seed).vae.save_pretrained(paths["vae"])
    text = build_tiny_text_encoder(seed=seed)
    text.clip_model.save_pretrained(paths["clip_l"])
    text.t5_model.save_pretrained(paths["t5"])
    text.clip_tokenizer.save_pretrained(paths["tokenizers"] / "clip")
    text.t5_tokenizer.save_pretrained(paths["tokenizers"] / "t5")
    return paths
