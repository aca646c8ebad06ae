"""LoRA adapters on the FLUX transformer: target presets, set-up through peft, and the file format.

The file format is the one ComfyUI and diffusers both read (reference.md §2–3):
``transformer.<diffusers module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r] and a scalar
``transformer.<module>.alpha``; the weight delta is (alpha / r) · B @ A. This module is the only one that
knows these key names.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from .config import LoraConfig
from .errors import TrainerInputError
from .fileio import save_safetensors, unique_path

log = logging.getLogger(__name__)

PREFIX = "transformer."
ADAPTER = "default"

_DOUBLE = r"transformer_blocks\.\d+"
_SINGLE = r"single_transformer_blocks\.\d+"
_DOUBLE_ATTN = rf"{_DOUBLE}\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_CONTEXT_ATTN = rf"{_DOUBLE}\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_SINGLE_ATTN = rf"{_SINGLE}\.attn\.(to_q|to_k|to_v)"
_DOUBLE_FF = rf"{_DOUBLE}\.(ff|ff_context)\.net\.(0\.proj|2)"
_CONTEXT_FF = rf"{_DOUBLE}\.ff_context\.net\.(0\.proj|2)"
_SINGLE_MLP = rf"{_SINGLE}\.(proj_mlp|proj_out)"
_MODULATION = rf"({_DOUBLE}\.(norm1|norm1_context)|{_SINGLE}\.norm)\.linear"


def _any(*patterns: str) -> str:
    return "|".join(f"({p})" for p in patterns)


# Full-name regexes (peft matches them with re.fullmatch), so "proj_out" never hits the final top-level proj_out.
TARGET_PRESETS: dict[str, str] = {
    "attention": _any(_DOUBLE_ATTN, _SINGLE_ATTN),
    "attention+ffs": _any(_DOUBLE_ATTN, _SINGLE_ATTN, _DOUBLE_FF, _SINGLE_MLP),
    "mmdit": _DOUBLE_ATTN,
    "all": _any(_DOUBLE_ATTN, _SINGLE_ATTN, rf"{_SINGLE}\.proj_out", _MODULATION),
    "all+ffs": _any(_DOUBLE_ATTN, _SINGLE_ATTN, _DOUBLE_FF, _SINGLE_MLP, _MODULATION),
    "context": _CONTEXT_ATTN,
    "context+ffs": _any(_CONTEXT_ATTN, _CONTEXT_FF),
}


def resolve_targets(targets: str) -> str:
    """A preset name, or a regex over full module names (e.g. ``transformer_blocks\\.0\\.attn\\.to_q``)."""
    if targets in TARGET_PRESETS:
        return TARGET_PRESETS[targets]
    try:
        re.compile(targets)
    except re.error as exc:
        raise TrainerInputError(
            f"lora.targets: '{targets}' is neither a preset ({', '.join(TARGET_PRESETS)}) nor a valid regex: {exc}."
        ) from exc
    return targets


def add_lora(transformer: torch.nn.Module, cfg: LoraConfig, seed: int = 0) -> list[str]:
    """Add a trainable LoRA adapter (base frozen) and return the targeted module names."""
    cfg.validate()
    pattern = resolve_targets(cfg.targets)
    transformer.requires_grad_(False)
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern)
    # lora_A's random init draws from the global RNG: seed it so a run is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            transformer.add_adapter(peft_cfg, adapter_name=ADAPTER)
        except ValueError as exc:
            if "not found in the base model" in str(exc) or "Target modules" in str(exc):
                raise TrainerInputError(
                    f"lora.targets: '{cfg.targets}' matches no linear layer of this transformer. "
                    f"Use a preset ({', '.join(TARGET_PRESETS)}) or a regex over names like "
                    f"'transformer_blocks.0.attn.to_q'."
                ) from exc
            raise
    return [name for name, module in transformer.named_modules() if isinstance(module, LoraLayer)]


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if p.requires_grad and ".lora_" in n]


def lora_state_dict(transformer: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter in the portable format (lora_A / lora_B / alpha per module, ``transformer.`` prefix)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        a = module.lora_A[ADAPTER].weight.detach()
        b = module.lora_B[ADAPTER].weight.detach()
        out[f"{PREFIX}{name}.lora_A.weight"] = a.to(dtype) if dtype else a
        out[f"{PREFIX}{name}.lora_B.weight"] = b.to(dtype) if dtype else b
        out[f"{PREFIX}{name}.alpha"] = torch.tensor(float(module.lora_alpha[ADAPTER]))
    return out


def set_lora_state_dict(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy portable LoRA weights into the existing adapter (same targets and ranks), e.g. on resume."""
    peft_sd = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX) and not k.endswith(".alpha")}
    result = set_peft_model_state_dict(transformer, peft_sd, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k and ADAPTER in k]
    if missing or result.unexpected_keys:
        raise TrainerInputError(
            f"LoRA weights do not fit this adapter ({len(missing)} missing, {len(result.unexpected_keys)} "
            f"unexpected, e.g. {(missing + list(result.unexpected_keys))[:2]}). Resume with the same rank and targets."
        )


def diffusers_adapter_metadata(transformer: torch.nn.Module) -> str:
    """peft config for diffusers' ``load_lora_adapter`` (it reads ``lora_adapter_metadata``), keys prefixed."""
    cfg = transformer.peft_config[ADAPTER]
    fields = {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "target_modules": sorted(n for n, m in transformer.named_modules() if isinstance(m, LoraLayer)),
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "use_dora": cfg.use_dora,
    }
    return json.dumps({f"{PREFIX}{k}": v for k, v in fields.items()})


def save_lora(
    path: Path,
    transformer: torch.nn.Module,
    metadata: dict[str, str],
    overwrite: bool = False,
    dtype: torch.dtype | None = torch.bfloat16,
) -> Path:
    """Write the LoRA file atomically; an existing file is kept (a numbered name is used) unless ``overwrite``."""
    path = Path(path)
    if not overwrite:
        path = unique_path(path)
    meta = {k: str(v) for k, v in metadata.items()}
    meta["lora_adapter_metadata"] = diffusers_adapter_metadata(transformer)
    save_safetensors(lora_state_dict(transformer, dtype), path, meta)
    log.info("saved LoRA to %s", path)
    return path


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file, with a clear error for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise TrainerInputError(f"LoRA file '{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise TrainerInputError(f"LoRA file '{path}' is not a readable safetensors file ({exc}).") from exc


def split_alphas(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Separate ``.alpha`` scalars (diffusers' ``network_alphas``) from the LoRA matrices."""
    weights = {k: v for k, v in state_dict.items() if not k.endswith(".alpha")}
    alphas = {k: float(v) for k, v in state_dict.items() if k.endswith(".alpha")}
    return weights, alphas
