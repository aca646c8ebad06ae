"""FLUX.1 transformer: shipped configs, BFL ⇄ diffusers conversion, and loading from a file, folder or dict.

Checkpoints in ComfyUI's ``models/diffusion_models`` use Black Forest Labs' key names (``double_blocks.N.img_attn.qkv``
…), optionally behind a ``model.diffusion_model.`` prefix, in bf16, fp16 or float8_e4m3fn. We train on diffusers'
``FluxTransformer2DModel``. diffusers' own converter hard-codes the 3072 width, so this module has its own, driven
by one mapping table that also serves the reverse direction and LoRA export. Width, depth, head size, context
widths and guidance are read from the tensor shapes.

Files are read lazily (``safe_open``; fused tensors are read slice by slice) into a model built on the meta device,
so a 24 GB checkpoint is held in memory once.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Union

import torch
from safetensors import SafetensorError, safe_open

from ..errors import TrainerInputError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BFL_PREFIX = "model.diffusion_model."
MLP_RATIO = 4  # diffusers' FluxTransformer2DModel has no mlp_ratio option: 4 in every block

Source = Union[str, Path, Mapping[str, torch.Tensor]]


def _load_configs() -> dict[str, dict]:
    return {name: json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))
            for name in ("flux1-dev", "flux1-schnell")}


FLUX_CONFIGS: dict[str, dict] = _load_configs()


def flux_config(name: str) -> dict:
    """A copy of the diffusers ``FluxTransformer2DModel`` config of ``"flux1-dev"`` or ``"flux1-schnell"``."""
    if name not in FLUX_CONFIGS:
        raise TrainerInputError(f"Unknown FLUX model '{name}'; choose one of {', '.join(FLUX_CONFIGS)}.")
    return json.loads(json.dumps(FLUX_CONFIGS[name]))


# LoRA target presets: full-name regexes over the diffusers module names (fragments shared with FLUX.2's).
_DOUBLE_BLOCK = r"transformer_blocks\.\d+"
_SINGLE_BLOCK = r"single_transformer_blocks\.\d+"
_DOUBLE_ATTN = rf"{_DOUBLE_BLOCK}\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_CONTEXT_ATTN = rf"{_DOUBLE_BLOCK}\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_SINGLE_ATTN = rf"{_SINGLE_BLOCK}\.attn\.(to_q|to_k|to_v)"
_DOUBLE_FF = rf"{_DOUBLE_BLOCK}\.(ff|ff_context)\.net\.(0\.proj|2)"
_CONTEXT_FF = rf"{_DOUBLE_BLOCK}\.ff_context\.net\.(0\.proj|2)"
_SINGLE_MLP = rf"{_SINGLE_BLOCK}\.(proj_mlp|proj_out)"
_MODULATION = rf"({_DOUBLE_BLOCK}\.(norm1|norm1_context)|{_SINGLE_BLOCK}\.norm)\.linear"


def _any(*patterns: str) -> str:
    return "|".join(f"({p})" for p in patterns)


# Full-name regexes (peft matches them with re.fullmatch), so "proj_out" never hits the final top-level proj_out.
# The default, "attention+ffs", is attention plus feed-forward of every block (the core recipe); "attention" is
# attention only. "all" adds the single blocks' output projections and the modulation linears.
TARGET_PRESETS: dict[str, str] = {
    "attention": _any(_DOUBLE_ATTN, _SINGLE_ATTN),
    "attention+ffs": _any(_DOUBLE_ATTN, _SINGLE_ATTN, _DOUBLE_FF, _SINGLE_MLP),
    "mmdit": _DOUBLE_ATTN,
    "all": _any(_DOUBLE_ATTN, _SINGLE_ATTN, rf"{_SINGLE_BLOCK}\.proj_out", _MODULATION),
    "all+ffs": _any(_DOUBLE_ATTN, _SINGLE_ATTN, _DOUBLE_FF, _SINGLE_MLP, _MODULATION),
    "context": _CONTEXT_ATTN,
    "context+ffs": _any(_CONTEXT_ATTN, _CONTEXT_FF),
}


# The estimator's activation coefficients (memory/estimate.py explains S, P, Q and the unit u), measured on narrow
# FLUX.1 blocks (head dim 128, hidden 512 and 1024); "context", "tiny" and "nano" are bounded from neighbouring
# measurements.
ACTIVATION_COEFFS = {  # (S_double, S_single, P_double, P_single, Q_double, Q_single)
    "attention": (15.6, 14.3, 22.6, 29.3, 7.2, 13.0),
    "attention+ffs": (21.2, 19.6, 28.6, 31.7, 7.3, 10.1),
    "mmdit": (15.6, 13.1, 22.6, 28.0, 7.2, 13.0),
    "all": (19.9, 21.6, 26.1, 32.7, 6.3, 9.1),
    "all+ffs": (25.0, 23.8, 32.5, 32.9, 6.4, 9.1),
    "context": (12.6, 13.1, 22.6, 28.0, 7.2, 13.0),
    "context+ffs": (13.4, 13.1, 28.6, 28.0, 7.3, 13.0),
    "tiny": (14.1, 14.3, 21.1, 29.3, 7.2, 13.0),
    "nano": (14.1, 14.3, 21.1, 29.3, 7.2, 13.0),
}
FROZEN_COEFFS = (14.1, 13.1, 21.1, 28.0, 7.2, 13.0)  # a block without LoRA whose input still needs its gradient


# ---------------------------------------------------------------------------------------------------------------
# The mapping table: diffusers module → (BFL module, part of a fused weight or None).
# Part p of a fused weight is rows [p·width, (p+1)·width); the last part of linear1 is the MLP (4·width rows).

_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # shift/scale halves swapped
}
_GUIDANCE = ("time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2")
_SWAPPED = "norm_out.linear"

_DOUBLE: dict[str, tuple[str, int | None]] = {
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
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
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
_SINGLE: dict[str, tuple[str, int | None]] = {
    "norm.linear": ("modulation.lin", None),
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "attn.norm_q": ("norm.query_norm", None),
    "attn.norm_k": ("norm.key_norm", None),
    "proj_out": ("linear2", None),
}
_NORM = re.compile(r"(^|\.)norm_(q|k|added_q|added_k)$")  # RMSNorm: diffusers `weight` = BFL `scale`, no bias


def _rows(part: int | None, width: int) -> slice | None:
    if part is None:
        return None
    end = (part + 1) * width if part < 3 else (3 + MLP_RATIO) * width
    return slice(part * width, end)


def diffusers_module_to_bfl(name: str, inner_dim: int = 3072) -> tuple[str, slice | None]:
    """BFL module holding diffusers module ``name``, and the rows of the fused BFL weight it occupies.

    ``("double_blocks.3.img_attn.qkv", slice(3072, 6144))`` for ``transformer_blocks.3.attn.to_k``; the slice is
    None when the module maps one to one. ``inner_dim`` is the model width (3072 for FLUX.1). ``norm_out.linear``
    has no row slice (its two halves are swapped in BFL) and raises ValueError, as does an unknown name.
    """
    if name == _SWAPPED:
        raise ValueError("norm_out.linear maps to final_layer.adaLN_modulation.1 with its shift/scale halves "
                         "swapped; it has no row-slice mapping")
    if name in _TOP:
        return _TOP[name], None
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
    table = (_DOUBLE if match.group(1) == "transformer_blocks" else _SINGLE) if match else {}
    if not match or match.group(3) not in table:
        raise ValueError(f"'{name}' is not a FLUX.1 transformer module with a BFL counterpart")
    bfl, part = table[match.group(3)]
    block = "double_blocks" if match.group(1) == "transformer_blocks" else "single_blocks"
    return f"{block}.{match.group(2)}.{bfl}", _rows(part, inner_dim)


@dataclass(frozen=True)
class _Entry:
    """One diffusers parameter and where it lives in the source."""

    diffusers_key: str
    source_key: str
    rows: slice | None = None
    swap_halves: bool = False


def _param_names(module: str) -> list[str]:
    return ["weight"] if _NORM.search(module) else ["weight", "bias"]


def _bfl_param(module: str, param: str) -> str:
    return "scale" if param == "weight" and _NORM.search(module) else param


def _plan(num_double: int, num_single: int, guidance: bool, width: int, bfl: bool) -> list[_Entry]:
    """Every diffusers parameter of a FLUX.1 model of this size, with its source key (BFL or diffusers)."""
    modules: list[tuple[str, str, int | None]] = [
        (d, b, None) for d, b in _TOP.items() if guidance or d not in _GUIDANCE
    ]
    for i in range(num_double):
        modules += [(f"transformer_blocks.{i}.{d}", f"double_blocks.{i}.{b}", p) for d, (b, p) in _DOUBLE.items()]
    for i in range(num_single):
        modules += [(f"single_transformer_blocks.{i}.{d}", f"single_blocks.{i}.{b}", p)
                    for d, (b, p) in _SINGLE.items()]
    entries = []
    for d, b, part in modules:
        for param in _param_names(d):
            if bfl:
                entries.append(_Entry(f"{d}.{param}", f"{b}.{_bfl_param(d, param)}", _rows(part, width),
                                      d == _SWAPPED))
            else:
                entries.append(_Entry(f"{d}.{param}", f"{d}.{param}"))
    return entries


# ---------------------------------------------------------------------------------------------------------------
# Reading tensors: from a dict, or lazily from a safetensors file.

_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # old "scaled_fp8" files and ComfyUI's current quant format
_IGNORED = re.compile(r"(^|\.)(scaled_fp8|scale_input|input_scale|comfy_quant|scale_weight|weight_scale)$")


class TensorReader:
    """Read access to a state dict or a lazily opened safetensors file (shared with encoders.py).

    Keys under ``prefix`` are used without it when any key has it (all-in-one checkpoints carry other models beside
    the prefixed one); per-tensor fp8 scales (ComfyUI's scaled fp8 formats) are applied to the weights they scale.
    """

    def __init__(self, name: str, keys: Iterable[str], getter, shape_of, prefix: str = BFL_PREFIX):
        self.name = name
        keys = list(keys)
        prefixed = [k for k in keys if k.startswith(prefix)] if prefix else []
        self._raw = {k[len(prefix):]: k for k in prefixed} if prefixed else {k: k for k in keys}
        self._getter, self._shape_of = getter, shape_of
        self.keys = {k for k in self._raw if not _IGNORED.search(k)}
        if any(k.endswith(".weight_scale_2") for k in self._raw):
            raise TrainerInputError(f"{name}: NVFP4-quantised checkpoints are not supported; use a bf16, fp16 or "
                                    "fp8 (float8_e4m3fn) file instead.")

    @classmethod
    def from_dict(cls, sd: Mapping[str, torch.Tensor], name: str = "state dict", prefix: str = BFL_PREFIX):
        return cls(name, sd.keys(), lambda k, rows: sd[k] if rows is None else sd[k][rows], lambda k: sd[k].shape,
                   prefix)

    @classmethod
    def from_file(cls, handle, path: Path, prefix: str = BFL_PREFIX):
        """``handle``: an open ``safe_open`` handle (see :func:`open_safetensors`); tensors are read on demand."""
        def get(key, rows):
            return handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows]

        return cls(str(path), handle.keys(), get, lambda k: handle.get_slice(k).get_shape(), prefix)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._shape_of(self._raw[key]))

    def get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        tensor = self._getter(self._raw[key], rows)
        scale = self._scale(key)
        if scale is not None:
            tensor = tensor.float() * scale
        return tensor

    def _scale(self, key: str) -> torch.Tensor | None:
        if not key.endswith(".weight"):
            return None
        for suffix in _SCALE_SUFFIXES:
            raw = self._raw.get(key[: -len(".weight")] + suffix)
            if raw is not None:
                scale = self._getter(raw, None).float()
                if scale.numel() != 1:
                    raise TrainerInputError(
                        f"{self.name}: '{key}' is quantised with a block-wise scale, which is not supported; use a "
                        "bf16, fp16 or plain fp8 (float8_e4m3fn) file instead.")
                return scale.reshape(())
        return None


def open_safetensors(path: Path, what: str):
    """``safe_open`` ``path`` (a context manager) with errors a user can act on: missing, wrong kind, truncated."""
    if not path.exists():
        raise TrainerInputError(f"{what} not found: {path}. Check the path (and that the download finished).")
    if path.is_dir():
        raise TrainerInputError(f"{what}: {path} is a folder where a .safetensors file was expected.")
    if path.suffix.lower() in (".gguf", ".ckpt", ".pt", ".pth", ".bin"):
        raise TrainerInputError(f"{what}: {path.name} is a {path.suffix} file; only .safetensors files are loaded "
                                "(pickled checkpoints are never opened, and GGUF is not supported).")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise TrainerInputError(f"{what}: {path} is not a readable safetensors file ({exc}); it may be truncated or "
                                "corrupt — download it again.") from exc


# ---------------------------------------------------------------------------------------------------------------
# Recognising the format and inferring the config from tensor shapes.

_OTHER_MODELS = (  # (key fragment, what such a file is) — to say what was found instead of a FLUX.1 transformer
    ("double_stream_modulation", "a FLUX.2 transformer (only FLUX.1 is supported)"),
    ("distilled_guidance_layer", "a Chroma transformer (only FLUX.1 is supported)"),
    ("joint_blocks.", "a Stable Diffusion 3 transformer"),
    ("input_blocks.", "a Stable Diffusion 1.x/2.x/XL UNet"),
    ("down_blocks.", "a diffusers UNet or VAE"),
    ("encoder.down.", "a VAE"),
    ("text_model.", "a CLIP text encoder"),
    ("encoder.block.", "a T5 text encoder"),
    ("lora_", "a LoRA"),
)


def _guess(keys: Iterable[str]) -> str | None:
    return next((what for frag, what in _OTHER_MODELS if any(frag in k for k in keys)), None)


def _not_flux(name: str, keys: Iterable[str], detail: str = "") -> TrainerInputError:
    keys = sorted(keys)
    guess = _guess(keys)
    found = f"it looks like {guess}" if guess else f"found {len(keys)} tensors such as {', '.join(keys[:3]) or 'none'}"
    return TrainerInputError(
        f"{name} is not a FLUX.1 transformer: {found}{'; ' + detail if detail else ''}. Choose the FLUX.1 dev or "
        "schnell transformer file (ComfyUI models/diffusion_models, e.g. flux1-dev.safetensors) or a diffusers "
        "FLUX.1 folder.")


def _block_count(keys: set[str], prefix: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _axes_dims_rope(head_dim: int) -> list[int]:
    # RoPE has no weights, so its split cannot be read from a file. FLUX.1's is [16, 56, 56] for head dim 128;
    # other head sizes (tiny test models) use [h/4, h/4, h/2], the layout of tiny.tiny_flux_config().
    if head_dim == 128:
        return [16, 56, 56]
    if head_dim % 8:
        raise ValueError(f"head dim {head_dim} is not a multiple of 8")
    return [head_dim // 4, head_dim // 4, head_dim // 2]


def _infer(src: TensorReader) -> tuple[list[_Entry], dict]:
    """Map every diffusers parameter to its source tensor and read the model config from the shapes."""
    keys = src.keys
    if "img_in.weight" in keys:
        bfl, width_key = True, "img_in.weight"
        num_double, num_single = _block_count(keys, "double_blocks"), _block_count(keys, "single_blocks")
        guidance = "guidance_in.in_layer.weight" in keys
    elif "x_embedder.weight" in keys:
        bfl, width_key = False, "x_embedder.weight"
        num_double = _block_count(keys, "transformer_blocks")
        num_single = _block_count(keys, "single_transformer_blocks")
        guidance = "time_text_embed.guidance_embedder.linear_1.weight" in keys
    else:
        raise _not_flux(src.name, keys)
    if num_double + num_single == 0:
        raise _not_flux(src.name, keys, "no transformer blocks")
    width, in_channels = src.shape(width_key)
    entries = _plan(num_double, num_single, guidance, width, bfl)
    missing = list(dict.fromkeys(e.source_key for e in entries if e.source_key not in keys))
    if missing and _guess(keys):
        raise _not_flux(src.name, keys)
    if missing:
        raise TrainerInputError(
            f"{src.name} is an incomplete FLUX.1 transformer: {len(missing)} tensors are missing, e.g. "
            f"{', '.join(missing[:3])}. The file is damaged or a partial export; download it again.")
    unused = keys - {e.source_key for e in entries}
    if unused:
        log.warning("%s: ignoring %d tensors that are not part of a FLUX.1 transformer, e.g. %s",
                    src.name, len(unused), ", ".join(sorted(unused)[:3]))

    by_key = {e.diffusers_key: e for e in entries}

    def shape(diffusers_key: str) -> tuple[int, ...]:
        e = by_key[diffusers_key]
        full = src.shape(e.source_key)
        return (len(range(*e.rows.indices(full[0]))), *full[1:]) if e.rows else full

    head_dim = shape(f"{'transformer_blocks' if num_double else 'single_transformer_blocks'}.0.attn.norm_q.weight")[0]
    out_channels = shape("proj_out.weight")[0]
    try:
        if width % head_dim:
            raise ValueError(f"width {width} is not a multiple of the head dim {head_dim}")
        config = {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": in_channels,
            "out_channels": None if out_channels == in_channels else out_channels,
            "num_layers": num_double,
            "num_single_layers": num_single,
            "attention_head_dim": head_dim,
            "num_attention_heads": width // head_dim,
            "joint_attention_dim": shape("context_embedder.weight")[1],
            "pooled_projection_dim": shape("time_text_embed.text_embedder.linear_1.weight")[1],
            "guidance_embeds": guidance,
            "axes_dims_rope": _axes_dims_rope(head_dim),
        }
    except ValueError as exc:
        raise _not_flux(src.name, keys, str(exc)) from exc
    return entries, config


def _convert(src: TensorReader, entries: list[_Entry], dtype: torch.dtype | None, device,
             copy: bool = False, keep: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``copy``: always into new memory (tensors read from a file are views of its mapping otherwise, and one kept
    tensor would keep the whole mapping, pages read included, in the process's resident set). Tensors in ``keep``
    (the base's storage dtype) are not cast to ``dtype``."""
    out = {}
    for e in entries:
        tensor = src.get(e.source_key, e.rows)
        if e.swap_halves:
            shift, scale = tensor.chunk(2, dim=0)
            tensor = torch.cat([scale, shift], dim=0)
        target = tensor.dtype if dtype is None or tensor.dtype == keep else dtype
        out[e.diffusers_key] = tensor.to(device=device, dtype=target, copy=copy)
    return out


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """BFL-format FLUX.1 state dict → (diffusers state dict, diffusers config).

    A ``model.diffusion_model.`` prefix is stripped (other keys of such a file are ignored); tensors keep their
    dtype unless ``dtype`` is given, except that per-tensor scaled fp8 weights are dequantised to fp32.
    Unfused tensors are views of the input where no dtype change is needed.
    """
    src = TensorReader.from_dict(sd)
    entries, config = _infer(src)
    return _convert(src, entries, dtype, None), config


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FLUX.1 state dict → BFL key names (q/k/v and the single-block MLP fused back)."""
    src = TensorReader.from_dict(sd)
    if "x_embedder.weight" not in src.keys:
        raise _not_flux("state dict", src.keys, "no diffusers x_embedder.weight")
    entries, config = _infer(src)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for e in entries:
        d_module = e.diffusers_key.rsplit(".", 1)[0]
        param = e.diffusers_key.rsplit(".", 1)[1]
        tensor = src.get(e.source_key, None)
        if d_module == _SWAPPED:
            scale, shift = tensor.chunk(2, dim=0)
            out[f"{_TOP[_SWAPPED]}.{param}"] = torch.cat([shift, scale], dim=0)
            continue
        b_module, rows = diffusers_module_to_bfl(d_module, width)
        key = f"{b_module}.{_bfl_param(d_module, param)}"
        if rows is None:
            out[key] = tensor
        else:
            parts.setdefault(key, []).append((rows.start, tensor))
    for key, pieces in parts.items():
        out[key] = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Loading.

def _empty_model(config: dict):
    """The transformer of ``config`` on the meta device (its ``_class_name``: any family's; default FLUX.1's)."""
    import diffusers
    from accelerate import init_empty_weights

    model_class = getattr(diffusers, config.get("_class_name", "FluxTransformer2DModel"))
    with init_empty_weights():
        return model_class.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _adopt(model, sd: dict[str, torch.Tensor], name: str, refuse=None) -> None:
    """Make the tensors of ``sd`` (part of the model) its parameters, after checking their shapes.

    ``refuse(name, keys, detail)``: the family's "not a transformer of this family" error (default FLUX.1's)."""
    for key, tensor in sd.items():
        module_name, _, attr = key.rpartition(".")
        expected = getattr(model.get_submodule(module_name), attr)
        if tuple(expected.shape) != tuple(tensor.shape):
            raise (refuse or _not_flux)(name, sd.keys(), f"'{key}' has shape {tuple(tensor.shape)}, expected "
                                                         f"{tuple(expected.shape)}")
    # assign=True adopts the loaded tensors as the parameters: no second copy of the weights.
    model.load_state_dict(sd, strict=False, assign=True)


def _groups(entries) -> list[tuple[int | None, str, list]]:
    """Entries grouped by module (a linear's weight and bias together) in execution order: (index of its block in
    ``transformer_blocks`` or None outside the blocks, module name, entries), the modules outside the blocks first.
    Works for every family whose entries carry a ``diffusers_key``."""
    groups: dict[tuple[int, int, str], list] = {}
    for e in entries:
        module = e.diffusers_key.rsplit(".", 1)[0]
        match = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", e.diffusers_key)
        key = (0, 0, module) if not match else \
            (1 if match.group(1) == "transformer_blocks" else 2, int(match.group(2)), module)
        groups.setdefault(key, []).append(e)
    n_double = 1 + max((i for kind, i, _ in groups if kind == 1), default=-1)
    return [(None if kind == 0 else i if kind == 1 else n_double + i, module, group)
            for (kind, i, module), group in sorted(groups.items(), key=lambda kv: kv[0][:2])]


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Give the memory of a block's freed compute-dtype copy back to the system. glibc keeps freed chunks below
    its (self-raising) mmap threshold in the heap, so without this the resident set creeps up by most of a
    block per block — measured: +150 MB over 8 blocks of width 1024, the whole point of streaming lost."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _stream(model, entries, read_group, name: str, dtype: torch.dtype, base_precision: str | None, refuse=None):
    """Fill the meta-device ``model`` module by module, each block linear going to its storage precision at once.

    ``read_group(entries)`` → the diffusers state dict of one module in the compute dtype; a linear's weight is in the
    compute dtype only until :func:`store_block` has converted it, so the peak is the final model plus one linear
    (and the file pages it was read from) — never the whole model, nor a whole block, in bf16 on the way to
    fp8/nf4/int8. ``refuse``: the family's error for a file of another shape (default FLUX.1's).
    """
    from ..memory.precision import store_block, transformer_blocks

    blocks = transformer_blocks(model)
    for index, module_name, group in _groups(entries):
        _adopt(model, read_group(group), name, refuse)
        module = model.get_submodule(module_name)
        if index is not None and base_precision and isinstance(module, torch.nn.Linear):
            store_block(blocks[index], base_precision, dtype, linears=[module])
            _return_freed_memory()
    left = [k for k, t in model.state_dict().items() if t.is_meta]
    if left:
        raise (refuse or _not_flux)(name, left, "these tensors were never loaded")
    return model.eval()


def _folder_subdir(folder: Path) -> str | None:
    """The subfolder of a diffusers FLUX.1 folder that holds the transformer (None: the folder itself), after
    checking its config names a FLUX.1 transformer and weights sit beside it."""
    sub = None
    if not (folder / "config.json").is_file():
        if (folder / "transformer" / "config.json").is_file():
            sub = "transformer"
        else:
            raise TrainerInputError(f"transformer folder {folder} has no config.json (nor transformer/config.json); "
                                    "give a diffusers FLUX.1 folder or the .safetensors transformer file.")
    config_path = folder / (sub or "") / "config.json"
    try:
        class_name = json.loads(config_path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError) as exc:
        raise TrainerInputError(f"{config_path} is not readable JSON ({exc}); restore the diffusers folder.") from exc
    if class_name != "FluxTransformer2DModel":
        raise TrainerInputError(f"{config_path} describes a {class_name}, not a FLUX.1 transformer "
                                "(FluxTransformer2DModel); point to the FLUX.1 transformer folder.")
    if not any(config_path.parent.glob("*.safetensors")):
        raise TrainerInputError(f"transformer folder {config_path.parent} has a config.json but no .safetensors "
                                "weights (diffusion_pytorch_model*.safetensors); the download is incomplete.")
    return sub


def _load_folder(folder: Path, dtype: torch.dtype, device):
    from diffusers import FluxTransformer2DModel

    sub = _folder_subdir(folder)
    try:
        model, info = FluxTransformer2DModel.from_pretrained(folder, subfolder=sub, torch_dtype=dtype,
                                                             local_files_only=True, low_cpu_mem_usage=True,
                                                             output_loading_info=True)
    except (OSError, SafetensorError, ValueError) as exc:
        raise TrainerInputError(f"Could not load the FLUX.1 transformer from {folder}: {exc}. Check that the weight "
                                "files are complete (download them again if in doubt).") from exc
    missing = sorted(info["missing_keys"])
    if missing:  # diffusers leaves them randomly initialised
        raise TrainerInputError(f"{folder}: the FLUX.1 transformer weights lack {len(missing)} tensors (e.g. "
                                f"{', '.join(missing[:3])}); the download is incomplete — download it again.")
    return model.to(device).eval()


def check_flux_transformer(path: str | Path) -> None:
    """Refuse a file or folder that is not a complete FLUX.1 transformer, reading only its header or config —
    so a wrong file is reported before any slow work (caching), not when it is loaded."""
    path = Path(path).expanduser()
    if path.is_dir():
        _folder_subdir(path)
        return
    with open_safetensors(path, "FLUX.1 transformer file") as handle:
        _infer(TensorReader.from_file(handle, path))


def load_flux_transformer(source: Source, dtype: torch.dtype = torch.bfloat16, device="cpu",
                          base_precision: str | None = None):
    """Load a FLUX.1 ``FluxTransformer2DModel``; never contacts a hub.

    ``source``: a ``.safetensors`` file with BFL keys (as in ComfyUI's models/diffusion_models; bf16, fp16 or fp8,
    optional ``model.diffusion_model.`` prefix) or diffusers keys; a diffusers folder (``config.json`` + weights, or
    a pipeline folder with ``transformer/``); or an in-memory state dict in either key format. Weights are cast to
    ``dtype`` on ``device``; with ``base_precision`` (``memory.base_precision``: fp8, nf4, int8, …) each block's
    linear weights go straight to that storage as the block is read (files and state dicts, not folders), so the
    model is never whole in ``dtype`` on the way.

    A state dict's tensors already in ``dtype`` on ``device`` (``device=None``: wherever each one is) become the
    parameters as they are, without a copy: the model shares memory with the caller's tensors (views included),
    which must then not change while it trains — the ComfyUI node trains on the MODEL's own weights this way.
    So do its tensors already in the storage dtype of ``base_precision`` (bf16, fp32, fp8: e.g. the fp8 weights of
    a MODEL loaded with weight_dtype fp8_e4m3fn): the block linears among them stay in that storage and are cast
    on use; the rest are cast to ``dtype`` when training starts (``apply_base_precision``).
    """
    if isinstance(source, Mapping):
        from ..memory.precision import STORAGE_DTYPES

        keep = STORAGE_DTYPES.get(base_precision or "")
        src = TensorReader.from_dict(source)
        entries, config = _infer(src)
        return _stream(_empty_model(config), entries, lambda group: _convert(src, group, dtype, device, keep=keep),
                       src.name, dtype, base_precision)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, dtype, device)
    with open_safetensors(path, "FLUX.1 transformer file") as handle:
        entries, config = _infer(TensorReader.from_file(handle, path))

    def read(group: list[_Entry]) -> dict[str, torch.Tensor]:
        # Opened per module: closing the file unmaps the pages just read, so they do not stay in the process's
        # resident set beside the converted weights (the whole file would otherwise end up resident).
        with open_safetensors(path, "FLUX.1 transformer file") as handle:
            return _convert(TensorReader.from_file(handle, path), group, dtype, device, copy=True)

    model = _stream(_empty_model(config), entries, read, str(path), dtype, base_precision)
    log.info("loaded FLUX.1 transformer %s: %d double + %d single blocks, width %d%s", path.name,
             config["num_layers"], config["num_single_layers"],
             config["num_attention_heads"] * config["attention_head_dim"],
             f", block weights streamed to {base_precision}" if base_precision else "")
    return model


def flux_file_config(source: Source) -> dict:
    """The diffusers config of a FLUX.1 file, state dict or folder, read from shapes (no weights loaded)."""
    return source_config(source, lambda reader: _infer(reader)[1], "FLUX.1 transformer file")


def source_config(source: Source, infer, what: str) -> dict:
    """A diffusers folder's config.json, or ``infer(reader)`` over a state dict's or a file's tensor shapes."""
    if isinstance(source, Mapping):
        return infer(TensorReader.from_dict(source))
    path = Path(source).expanduser()
    if path.is_dir():
        config_path = path / "config.json" if (path / "config.json").is_file() else path / "transformer" / "config.json"
        return json.loads(config_path.read_text(encoding="utf-8"))
    with open_safetensors(path, what) as handle:
        return infer(TensorReader.from_file(handle, path))
