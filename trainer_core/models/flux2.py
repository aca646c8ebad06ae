"""FLUX.2 transformer (klein base 4B / 9B, dev): shipped configs, BFL ⇄ diffusers conversion, loading from a file,
folder or dict, latent packing and position ids, text conditioning, target presets — and tiny offline models.

Facts this module encodes (diffusers ``Flux2Transformer2DModel``, ComfyUI 0.33.0 ``comfy/ldm/flux/model.py``):

* Latents are the VAE's 32 channels at /8, pixel-shuffled 2×2 to 128 channels at /16 and normalised by the VAE's
  BatchNorm statistics — which is what ComfyUI's FLUX.2 VAE encode returns. The transformer's patch size is 1:
  every latent cell is one token, ``[B, C, H, W] → [B, H·W, C]``.
* RoPE on 4 axes (T, H, W, L), θ = 2000: image token (h, w) has id (0, h, w, 0), text token l has (0, 0, 0, l).
* The text conditioning is one sequence of hidden states (Qwen3 / Mistral layers stacked: 7680, 12288 or 15360
  wide); there is no pooled vector. Only dev embeds a guidance value; klein base is sampled with real CFG.
* No biases anywhere; modulation is global (``double_stream_modulation_img/_txt``, ``single_stream_modulation``);
  single blocks fuse q, k, v and the MLP input into ``to_qkv_mlp_proj`` (BFL ``linear1``) and the attention and MLP
  outputs into ``to_out`` (BFL ``linear2``) — diffusers keeps those fused, so only the double blocks' qkv split.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..errors import TrainerInputError
from .flux import _CONTEXT_ATTN, _DOUBLE_ATTN, _DOUBLE_BLOCK, _SINGLE_BLOCK, BFL_PREFIX, CONFIG_DIR, Source, \
    TensorReader, _any, _empty_model, _stream, open_safetensors, source_config

log = logging.getLogger(__name__)

CLASS_NAME = "Flux2Transformer2DModel"
CONFIG_NAMES = ("flux2-klein-4b", "flux2-klein-9b", "flux2-dev")
LATENT_CHANNELS = 128
LATENT_DOWNSCALE = 16  # pixels per latent cell (VAE /8, then the 2×2 pixel shuffle)
ROPE_AXES = 4
# Keys only a FLUX.2 transformer has (BFL and diffusers spelling); ComfyUI detects FLUX.2 by the first.
MARKERS = ("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight")


def flux2_config(name: str) -> dict:
    """A copy of the diffusers ``Flux2Transformer2DModel`` config of one of :data:`CONFIG_NAMES`."""
    if name not in CONFIG_NAMES:
        raise TrainerInputError(f"Unknown FLUX.2 model '{name}'; choose one of {', '.join(CONFIG_NAMES)}.")
    return json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Latents, position ids, schedule

def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H·W, C]: one token per latent cell, row-major (as ``Flux2Pipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height`` × ``width`` cells."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """Position ids [H·W, 4] = (T, H, W, L) = (0, row, col, 0)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1)


REFERENCE_TIME_SCALE = 10  # reference i sits at time coordinate 10 + 10·i ("index" method)


def reference_ids(sizes, device=None) -> torch.Tensor:
    """Position ids of reference latents of sizes [(h, w), …]: reference i at (10 + 10·i, row, col, 0), as
    ``Flux2Pipeline._prepare_image_ids`` and ComfyUI's "index" method (``ref_index_scale`` 10) build them."""
    blocks = []
    for i, (h, w) in enumerate(sizes):
        ids = latent_image_ids(h, w, device)
        ids[:, 0] = REFERENCE_TIME_SCALE * (i + 1)
        blocks.append(ids)
    return torch.cat(blocks)


def text_ids(length: int, device=None) -> torch.Tensor:
    """Position ids [L, 4] = (0, 0, 0, l): text tokens sit on the L axis."""
    ids = torch.zeros(length, ROPE_AXES, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def empirical_mu(image_tokens: int, steps: int) -> float:
    """μ of FLUX.2's resolution- and step-dependent shift σ' = e^μ / (e^μ + 1/σ − 1).

    The fit BFL published and diffusers' FLUX.2 pipelines use (``compute_empirical_mu``): linear in the token count,
    interpolated between its 10- and 200-step lines, and the 200-step line alone above 4300 tokens.
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m_200 = a2 * image_tokens + b2
    if image_tokens > 4300:
        return m_200
    m_10 = a1 * image_tokens + b1
    a = (m_200 - m_10) / 190.0
    return a * steps + (m_200 - 200.0 * a)


def resolution_shift(image_tokens: int, steps: int) -> float:
    return math.exp(empirical_mu(image_tokens, steps))


def call_transformer(transformer, tokens, sigma, hidden, img_ids, txt_ids, guidance: float, dtype) -> torch.Tensor:
    """One forward pass; returns the predicted tokens. ``timestep`` is σ ∈ [0, 1] (the model multiplies by 1000)."""
    b = tokens.shape[0]
    guidance_vec = (torch.full((b,), guidance, device=tokens.device, dtype=dtype)
                    if transformer.config.guidance_embeds else None)
    return transformer(hidden_states=tokens, encoder_hidden_states=hidden, timestep=sigma, img_ids=img_ids,
                       txt_ids=txt_ids, guidance=guidance_vec, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------------------------
# LoRA target presets (full-name regexes: peft fullmatches a string target). A double block's ``attn.to_out`` is a
# ModuleList, so its linear is ``to_out.0``; a single block's ``attn.to_out`` is the fused output linear itself.
# Single blocks cannot separate attention from MLP (both live in the fused linears), so every preset that touches
# single-block attention trains those fused linears — as diffusers' FLUX.2 recipes do by default. The double-block
# attention fragments are FLUX.1's (the same module names).
_SINGLE_FUSED = rf"{_SINGLE_BLOCK}\.attn\.(to_qkv_mlp_proj|to_out)"
_DOUBLE_FF = rf"{_DOUBLE_BLOCK}\.(ff|ff_context)\.(linear_in|linear_out)"
_CONTEXT_FF = rf"{_DOUBLE_BLOCK}\.ff_context\.(linear_in|linear_out)"
_MODULATION = r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear"

TARGET_PRESETS: dict[str, str] = {
    "attention": _any(_DOUBLE_ATTN, _SINGLE_FUSED),
    "attention+ffs": _any(_DOUBLE_ATTN, _SINGLE_FUSED, _DOUBLE_FF),
    "mmdit": _DOUBLE_ATTN,
    "all": _any(_DOUBLE_ATTN, _SINGLE_FUSED, _DOUBLE_FF, _MODULATION),  # every linear of every block + modulation
    "all+ffs": _any(_DOUBLE_ATTN, _SINGLE_FUSED, _DOUBLE_FF, _MODULATION),
    "context": _CONTEXT_ATTN,
    "context+ffs": _any(_CONTEXT_ATTN, _CONTEXT_FF),
}
SINGLE_OUTPUT = r"single_transformer_blocks\.{index}\.attn\.to_out"  # the "tiny"/"nano" presets' layer


# ---------------------------------------------------------------------------------------------------------------
# The estimator's activation coefficients (memory/estimate.py explains S, P, Q and the unit u). Measured with the dry
# run's tracker (bench/dryrun.py) on narrow FLUX.2 blocks (head dim 128, hidden 512 and 1024, the 1024 values
# taken: they fall slightly with width), from 2- and 3-block stacks of each kind with and without checkpointing.
# FLUX.2 blocks keep more than FLUX.1's per u: the fused single-block projection is 9 u wide (q, k, v + the SwiGLU
# input) and the SwiGLU MLP keeps its gate and value. "all+ffs" = "all" (the same layers); "attention+ffs" and
# "context+ffs" at 1024 and "tiny"/"nano" (one single block's output layer) are bounded from neighbouring
# measurements.
ACTIVATION_COEFFS = {  # (S_double, S_single, P_double, P_single, Q_double, Q_single)
    "attention": (20.3, 25.3, 27.7, 40.6, 6.3, 14.3),
    "attention+ffs": (24.8, 25.3, 29.5, 40.6, 4.9, 14.3),
    "mmdit": (20.3, 20.1, 27.7, 39.3, 6.3, 18.2),
    "all": (28.7, 27.3, 32.1, 41.6, 2.4, 13.4),
    "all+ffs": (28.7, 27.3, 32.1, 41.6, 2.4, 13.4),
    "context": (19.3, 20.1, 26.7, 39.3, 2.7, 18.2),
    "context+ffs": (19.9, 20.1, 27.0, 39.3, 2.5, 18.2),
    "tiny": (19.1, 25.3, 26.4, 40.6, 5.0, 14.3),
    "nano": (19.1, 25.3, 26.4, 40.6, 5.0, 14.3),
}
FROZEN_COEFFS = (19.1, 20.1, 26.4, 39.3, 5.0, 18.2)  # a block without LoRA whose input still needs its gradient


# Memory tiers per model size: the same names as FLUX.1's (memory/presets.py), each the plan for a card of that size
# at 1024² (rank 16, attention targets, 512 text tokens) with 1 GiB left for the CUDA context and what the card
# keeps, after the fit check's 10 % + 256 MiB margin. Found by searching the estimator's plans (base precision,
# swapped blocks, checkpointed blocks, activation offload, optimizer) for the lowest step-time floor at 25 GB/s
# host→device and 165 TFLOP/s; among plans within 10 % of it, the one whose transfers hide behind the compute
# (≤ half its time), then an fp8/bf16 base over nf4, then the fewest bytes moved. Estimated peaks at 1024² / 512²:
#
# | tier | klein-4B                    | klein-9B                                 | dev                                     |
# |------|-----------------------------|------------------------------------------|-----------------------------------------|
# | 8gb  | fp8, ckpt 24/25: 5.9 / 4.8  | fp8, swap 23, act→host: 6.0 / 5.0        | nf4, swap 56, act→host, adamw8bit: 6.2 / 4.6 |
# | 12gb | fp8, ckpt 18/25: 9.4 / 6.0  | fp8, swap 8, act→host, adamw8bit: 9.7 / 8.7 | fp8, swap 52, act→host, adamw8bit: 9.3 / 7.8 |
# | 16gb | fp8, ckpt 12/25: 12.9 / 7.1 | fp8, ckpt 30/32: 12.7 / 10.6             | fp8, swap 45, act→host, adamw8bit: 13.0 / 11.5 |
# | 24gb | bf16, ckpt 5/25: 20.3 / 11.8 | fp8, ckpt 20/32: 20.6 / 13.2            | fp8, swap 31, act→host, adamw8bit: 20.3 / 18.8 |
# | 48gb | bf16, no ckpt: 22.6 / 12.5  | bf16, ckpt 1/32: 42.1 / 25.6             | fp8, ckpt 51/56: 42.1 / 35.6            |
# | 80gb | bf16, no ckpt, batch 2: 37.7 / 17.6 | bf16, no ckpt, batch 2: 68.1 / 34.2 | fp8, ckpt 26/56: 71.5 / 45.4           |
#
# (GiB; "ckpt n/N": n of the N blocks checkpointed, the last ones keep their activations; 48gb and 80gb also compile
# the blocks, as FLUX.1's do.) FLUX.2 dev at 1024² does not quite fit an 8 GB card by this estimate (6.2 GiB + the
# margin = 7.03 GiB; its fused single-block projection alone is 0.7 GB in bf16 while it computes): its 8gb tier is
# the most frugal plan there is, and fits at 512².

def _tier(base_precision: str, *, swap: int = 0, keep: int = 0, offload: bool = False, checkpointing: bool = True,
          optimizer: str = "adamw", compile_blocks: bool = False, batch: int = 1) -> dict:
    """MemoryConfig knobs of one tier; ``keep``: blocks (the last ones) that keep their activations."""
    return dict(base_precision=base_precision, blocks_to_swap=swap, gradient_checkpointing=checkpointing,
                uncheckpointed_blocks=keep, offload_activations=offload, compile_blocks=compile_blocks,
                batch_size=batch, optimizer=optimizer)


MEMORY_PRESETS: dict[str, dict[str, dict]] = {
    "flux2-klein-4b": {
        "8gb": _tier("fp8", keep=1),
        "12gb": _tier("fp8", keep=7),
        "16gb": _tier("fp8", keep=13),
        "24gb": _tier("bf16", keep=20),
        "48gb": _tier("bf16", checkpointing=False, compile_blocks=True),
        "80gb": _tier("bf16", checkpointing=False, compile_blocks=True, batch=2),
    },
    "flux2-klein-9b": {
        "8gb": _tier("fp8", swap=23, offload=True),
        "12gb": _tier("fp8", swap=8, offload=True, optimizer="adamw8bit"),
        "16gb": _tier("fp8", keep=2),
        "24gb": _tier("fp8", keep=12),
        "48gb": _tier("bf16", keep=31, compile_blocks=True),
        "80gb": _tier("bf16", checkpointing=False, compile_blocks=True, batch=2),
    },
    "flux2-dev": {
        "8gb": _tier("nf4", swap=56, offload=True, optimizer="adamw8bit"),
        "12gb": _tier("fp8", swap=52, offload=True, optimizer="adamw8bit"),
        "16gb": _tier("fp8", swap=45, offload=True, optimizer="adamw8bit"),
        "24gb": _tier("fp8", swap=31, offload=True, optimizer="adamw8bit"),
        "48gb": _tier("fp8", keep=5, compile_blocks=True),
        "80gb": _tier("fp8", keep=30, compile_blocks=True),
    },
}


def _size(config: Mapping) -> tuple[int, int]:
    return config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"] + config["num_single_layers"]


def memory_presets(config: Mapping) -> dict[str, dict]:
    """The tiers of the shipped model this ``config`` is (by width and depth); for another size (a pruned or a
    tiny model) those of the largest shipped model no wider than it, klein-4B's for anything narrower."""
    width, depth = _size(config)
    shipped = sorted(CONFIG_NAMES, key=lambda name: _size(flux2_config(name)))
    exact = [name for name in shipped if _size(flux2_config(name)) == (width, depth)]
    narrower = [name for name in shipped if _size(flux2_config(name))[0] <= width]
    return MEMORY_PRESETS[(exact or narrower or shipped[:1])[-1]]


# ---------------------------------------------------------------------------------------------------------------
# BFL ⇄ diffusers: diffusers module → (BFL module, part of a fused qkv or None). Every parameter is a weight
# (FLUX.2 has no biases); RMSNorm weights are BFL ``scale``; norm_out.linear's shift/scale halves are swapped.

_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_GUIDANCE = ("time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2")
_SWAPPED = "norm_out.linear"
_DOUBLE_MAP: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.norm_q": ("img_attn.norm.query_norm", None),
    "attn.norm_k": ("img_attn.norm.key_norm", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
    "attn.norm_added_k": ("txt_attn.norm.key_norm", None),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
_SINGLE_MAP: dict[str, tuple[str, int | None]] = {
    "attn.to_qkv_mlp_proj": ("linear1", None),
    "attn.to_out": ("linear2", None),
    "attn.norm_q": ("norm.query_norm", None),
    "attn.norm_k": ("norm.key_norm", None),
}
_NORM = re.compile(r"\.norm_(q|k|added_q|added_k)$")


@dataclass(frozen=True)
class _Entry:
    diffusers_key: str
    bfl_key: str
    rows: slice | None  # rows of the fused BFL qkv weight
    swap_halves: bool


def _plan(num_double: int, num_single: int, guidance: bool, width: int) -> list[_Entry]:
    """Every parameter of a FLUX.2 model of this size: its diffusers key and where it lives in a BFL file."""
    modules = [(d, b, None) for d, b in _TOP.items() if guidance or d not in _GUIDANCE]
    for i in range(num_double):
        modules += [(f"transformer_blocks.{i}.{d}", f"double_blocks.{i}.{b}", p) for d, (b, p) in _DOUBLE_MAP.items()]
    for i in range(num_single):
        modules += [(f"single_transformer_blocks.{i}.{d}", f"single_blocks.{i}.{b}", p)
                    for d, (b, p) in _SINGLE_MAP.items()]
    return [_Entry(f"{d}.weight", f"{b}.{'scale' if _NORM.search(d) else 'weight'}",
                   None if p is None else slice(p * width, (p + 1) * width), d == _SWAPPED)
            for d, b, p in modules]


def bfl_layout(num_double: int, num_single: int, guidance: bool, width: int) -> list[_Entry]:
    """Every weight of a FLUX.2 transformer of this size: its diffusers key, its BFL checkpoint key, its rows in a
    fused BFL weight and whether its halves are swapped (the final modulation) — for readers of other layouts of
    the same weights (ComfyUI's module)."""
    return _plan(num_double, num_single, guidance, width)


def _block_count(keys: set[str], prefix: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _not_flux2(name: str, keys, detail: str) -> TrainerInputError:
    keys = sorted(keys)
    if any(k in keys for k in ("img_in.weight", "x_embedder.weight")):
        found = "it is a FLUX.1 transformer (it has no FLUX.2 global modulation)"
    else:
        found = f"found {len(keys)} tensors such as {', '.join(keys[:3]) or 'none'}"
    return TrainerInputError(
        f"{name} is not a FLUX.2 transformer: {found}{'; ' + detail if detail else ''}. Choose a FLUX.2 klein base "
        "or dev transformer (ComfyUI models/diffusion_models) or a diffusers FLUX.2 folder — or load a FLUX.1 file "
        "through trainer_core.models.family.load_transformer, which detects the family.")


def _infer(src: TensorReader) -> tuple[list[_Entry], dict, bool]:
    """(entries, diffusers config, whether the source uses BFL keys), read from the tensor names and shapes."""
    keys = src.keys
    if MARKERS[0] in keys and "img_in.weight" in keys:
        bfl, double, single = True, "double_blocks", "single_blocks"
    elif MARKERS[1] in keys and "x_embedder.weight" in keys:
        bfl, double, single = False, "transformer_blocks", "single_transformer_blocks"
    else:
        raise _not_flux2(src.name, keys, "")
    num_double, num_single = _block_count(keys, double), _block_count(keys, single)
    guidance = ("guidance_in.in_layer.weight" if bfl else f"{_GUIDANCE[0]}.weight") in keys
    width, in_channels = src.shape("img_in.weight" if bfl else "x_embedder.weight")
    entries = _plan(num_double, num_single, guidance, width)
    source_key = (lambda e: e.bfl_key) if bfl else (lambda e: e.diffusers_key)
    missing = list(dict.fromkeys(source_key(e) for e in entries if source_key(e) not in keys))
    if missing:
        raise TrainerInputError(
            f"{src.name} is an incomplete FLUX.2 transformer: {len(missing)} tensors are missing, e.g. "
            f"{', '.join(missing[:3])}. The file is damaged or a partial export; download it again.")
    unused = keys - {source_key(e) for e in entries}
    if unused:
        log.warning("%s: ignoring %d tensors that are not part of a FLUX.2 transformer, e.g. %s",
                    src.name, len(unused), ", ".join(sorted(unused)[:3]))
    norm = f"{double}.0.img_attn.norm.query_norm.scale" if bfl and num_double else (
        f"{single}.0.norm.query_norm.scale" if bfl else
        f"{double if num_double else single}.0.attn.norm_q.weight")
    head_dim = src.shape(norm)[0]
    if num_double:
        mlp_rows = src.shape(f"{double}.0.img_mlp.0.weight" if bfl else f"{double}.0.ff.linear_in.weight")[0]
    else:
        fused = src.shape(f"{single}.0.linear1.weight" if bfl else f"{single}.0.attn.to_qkv_mlp_proj.weight")[0]
        mlp_rows = fused - 3 * width
    out_channels = src.shape("final_layer.linear.weight" if bfl else "proj_out.weight")[0]
    if width % head_dim or head_dim % ROPE_AXES:
        raise _not_flux2(src.name, keys, f"width {width} and head size {head_dim} do not fit FLUX.2's 4-axis RoPE")
    config = {
        "_class_name": CLASS_NAME,
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": num_double,
        "num_single_layers": num_single,
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": src.shape("txt_in.weight" if bfl else "context_embedder.weight")[1],
        "timestep_guidance_channels": src.shape(
            "time_in.in_layer.weight" if bfl else "time_guidance_embed.timestep_embedder.linear_1.weight")[1],
        "mlp_ratio": mlp_rows / 2 / width,
        # RoPE has no weights: FLUX.2 splits the head into 4 equal axes (32 each at head size 128), θ = 2000.
        "axes_dims_rope": [head_dim // ROPE_AXES] * ROPE_AXES,
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": guidance,
    }
    return entries, config, bfl


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _convert(src: TensorReader, entries: list[_Entry], bfl: bool, dtype, device, copy: bool = False
             ) -> dict[str, torch.Tensor]:
    """``copy``: always into new memory (a tensor read from a file is a view of its mapping otherwise)."""
    out = {}
    for e in entries:
        if bfl:
            tensor = src.get(e.bfl_key, e.rows)
            if e.swap_halves:
                tensor = _swap_halves(tensor)
        else:
            tensor = src.get(e.diffusers_key)
        out[e.diffusers_key] = tensor.to(device=device, dtype=dtype or tensor.dtype, copy=copy)
    return out


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """BFL-format FLUX.2 state dict (optionally under ``model.diffusion_model.``) → (diffusers state dict, config)."""
    src = TensorReader.from_dict(sd)
    entries, config, bfl = _infer(src)
    if not bfl:
        raise _not_flux2(src.name, src.keys, "it already uses diffusers key names")
    return _convert(src, entries, True, dtype, None), config


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FLUX.2 state dict → BFL key names (each double block's q, k, v fused back into ``qkv``)."""
    src = TensorReader.from_dict(sd, prefix="")
    entries, config, bfl = _infer(src)
    if bfl:
        raise _not_flux2(src.name, src.keys, "it already uses BFL key names")
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for e in entries:
        tensor = src.get(e.diffusers_key)
        if e.rows is not None:
            parts.setdefault(e.bfl_key, []).append((e.rows.start, tensor))
        else:
            out[e.bfl_key] = _swap_halves(tensor) if e.swap_halves else tensor
    for key, pieces in parts.items():
        out[key] = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=0)
    return out


def diffusers_module_to_bfl(name: str, inner_dim: int) -> tuple[str, slice | None]:
    """BFL module holding diffusers module ``name`` and its rows in a fused BFL weight (None: one to one).

    ``norm_out.linear`` (halves swapped) and names outside the table raise ValueError.
    """
    if name == _SWAPPED:
        raise ValueError("norm_out.linear maps to final_layer.adaLN_modulation.1 with its halves swapped")
    if name in _TOP:
        return _TOP[name], None
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
    table = (_DOUBLE_MAP if match.group(1) == "transformer_blocks" else _SINGLE_MAP) if match else {}
    if not match or match.group(3) not in table:
        raise ValueError(f"'{name}' is not a FLUX.2 transformer module with a BFL counterpart")
    bfl, part = table[match.group(3)]
    block = "double_blocks" if match.group(1) == "transformer_blocks" else "single_blocks"
    return f"{block}.{match.group(2)}.{bfl}", None if part is None else slice(part * inner_dim, (part + 1) * inner_dim)


# ---------------------------------------------------------------------------------------------------------------
# Loading

def _load_folder(folder: Path, dtype: torch.dtype, device):
    from diffusers import Flux2Transformer2DModel

    sub = None if (folder / "config.json").is_file() else "transformer"
    config_path = folder / (sub or "") / "config.json"
    try:
        class_name = json.loads(config_path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError) as exc:
        raise TrainerInputError(f"{config_path} is not readable JSON ({exc}); give a diffusers FLUX.2 folder "
                                "(config.json + weights) or the .safetensors transformer file.") from exc
    if class_name != CLASS_NAME:
        raise TrainerInputError(f"{config_path} describes a {class_name}, not a FLUX.2 transformer ({CLASS_NAME}); "
                                "point to the FLUX.2 transformer folder.")
    try:
        model = Flux2Transformer2DModel.from_pretrained(folder, subfolder=sub, torch_dtype=dtype,
                                                        local_files_only=True, low_cpu_mem_usage=True)
    except (OSError, ValueError) as exc:
        raise TrainerInputError(f"Could not load the FLUX.2 transformer from {folder}: {exc}. Check that the weight "
                                "files are complete (download them again if in doubt).") from exc
    return model.to(device).eval()


def check_flux2_transformer(path: Path) -> None:
    """Refuse a file that is not a complete FLUX.2 transformer from its header alone (folders: config.json)."""
    if path.is_dir():
        return
    with open_safetensors(path, "FLUX.2 transformer file") as handle:
        _infer(TensorReader.from_file(handle, path))


def load_flux2_transformer(source: Source, dtype: torch.dtype = torch.bfloat16, device="cpu",
                           base_precision: str | None = None):
    """Load a FLUX.2 ``Flux2Transformer2DModel`` from a BFL or diffusers ``.safetensors`` file (bf16, fp16, fp8 or
    per-tensor scaled fp8; optional ``model.diffusion_model.`` prefix), a diffusers folder, or a state dict.
    Never contacts a hub; width, depth, head size, context width and guidance are read from the tensor shapes.

    With ``base_precision`` (``memory.base_precision``: fp8, nf4, int8, …) files and state dicts stream tensor by
    tensor to it (``flux._stream``): the model is never whole in ``dtype`` on the way. A state dict's tensors already
    in ``dtype`` on ``device`` (``device=None``: wherever each one is) become the parameters without a copy.
    """
    if isinstance(source, Mapping):
        src = TensorReader.from_dict(source)
        entries, config, bfl = _infer(src)
        return _stream(_empty_model(config), entries, lambda group: _convert(src, group, bfl, dtype, device),
                       src.name, dtype, base_precision, _not_flux2)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, dtype, device)
    with open_safetensors(path, "FLUX.2 transformer file") as handle:
        entries, config, bfl = _infer(TensorReader.from_file(handle, path, prefix=BFL_PREFIX))

    def read(group: list[_Entry]) -> dict[str, torch.Tensor]:
        # Opened per module: closing the file unmaps the pages just read (flux.load_flux_transformer says why).
        with open_safetensors(path, "FLUX.2 transformer file") as handle:
            return _convert(TensorReader.from_file(handle, path, prefix=BFL_PREFIX), group, bfl, dtype, device,
                            copy=True)

    model = _stream(_empty_model(config), entries, read, str(path), dtype, base_precision, _not_flux2)
    log.info("loaded FLUX.2 transformer %s: %d double + %d single blocks, width %d%s", path.name,
             config["num_layers"], config["num_single_layers"],
             config["num_attention_heads"] * config["attention_head_dim"],
             f", block weights streamed to {base_precision}" if base_precision else "")
    return model


def flux2_file_config(source: Source) -> dict:
    """The diffusers config of a FLUX.2 file, state dict or folder, read from shapes (no weights loaded)."""
    return source_config(source, lambda reader: _infer(reader)[1], "FLUX.2 transformer file")


# ---------------------------------------------------------------------------------------------------------------
# Tiny models for tests and demos: FLUX.2's architecture at width 128 (4 heads of 32, RoPE axes of 8), the real
# 128 latent channels, and text states 3 × 16 wide (the real encoders stack three hidden layers).

def tiny_flux2_config(variant: str = "klein") -> dict:
    """Tiny klein-shaped (no guidance embedding) or dev-shaped (guidance, deeper single stack) config."""
    if variant not in ("klein", "dev"):
        raise ValueError(f"variant must be 'klein' or 'dev', got {variant!r}")
    dev = variant == "dev"
    return {
        "patch_size": 1,
        "in_channels": LATENT_CHANNELS,
        "out_channels": None,
        "num_layers": 1,
        "num_single_layers": 3 if dev else 2,
        "attention_head_dim": 32,
        "num_attention_heads": 4,
        "joint_attention_dim": 60 if dev else 48,
        "timestep_guidance_channels": 32,
        "mlp_ratio": 3.0,
        "axes_dims_rope": [8, 8, 8, 8],
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": dev,
    }


def build_tiny_flux2_transformer(variant: str = "klein", seed: int = 0, prior_init: bool = True):
    """A tiny fp32 ``Flux2Transformer2DModel`` from ``seed``.

    With ``prior_init`` it starts on a skip path, as ``tiny.build_tiny_transformer`` does for FLUX.1: the input
    and output projections are orthonormal inverses and the final norm is plain, so a token passes through the
    blocks' gated updates unchanged — a LoRA then learns content instead of undoing random projections.
    """
    from diffusers import Flux2Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Flux2Transformer2DModel(**tiny_flux2_config(variant)).eval()
        if prior_init:
            with torch.no_grad():
                basis, _ = torch.linalg.qr(torch.randn(model.inner_dim, model.config.in_channels))
                model.x_embedder.weight.copy_(basis)
                model.proj_out.weight.copy_(basis.T)
                model.norm_out.linear.weight.zero_()
    return model
