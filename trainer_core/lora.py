"""Adapters on the FLUX transformer (and optionally its text encoders): target presets, set-up through peft, and
the file format.

Algorithms (``lora.algorithm``): LoRA (optionally DoRA), LoKr, LoHa and OFT, all through peft. The default file
uses keys that ComfyUI and diffusers read (reference.md §2–3), ``transformer.<diffusers module>.<tensor>``:

* LoRA: ``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r] and a scalar ``alpha``; delta = (alpha / r)·B@A.
  The trained scale is folded into ``lora_B`` and ``alpha`` is written as r, so the matrices alone give the delta:
  loaders that read alpha (ComfyUI, kohya-style tools, diffusers' ``load_lora_weights``) and loaders that do not
  (diffusers' ``load_lora_adapter`` on a file) apply the same LoRA. diffusers refuses a file that carries alpha
  both as tensors and in its ``lora_adapter_metadata`` header, so there is no such header. FLUX.2 files carry no
  LoRA ``alpha`` at all: diffusers' FLUX.2 ``load_lora_weights`` refuses keys without "lora" in them.
  DoRA adds ``dora_scale`` [out, 1] in ComfyUI's convention (see :func:`_dora_scale`).
* LoKr: ``lokr_w1`` / ``lokr_w2`` (or their ``_a``/``_b`` factors) and ``alpha``; delta = kron(w1, w2)·scale.
* LoHa: ``hada_w1_a`` … ``hada_w2_b`` and ``alpha``; delta = (w1a@w1b)·(w2a@w2b)·alpha/r.
* OFT: ``diff`` — the full weight delta. peft's OFT rotates a layer's *input* channels, ComfyUI's OFT format its
  *output* channels, so no compact OFT file loads in ComfyUI with the same effect; the delta does, at the size of
  the targeted weights.

Text-encoder LoRAs use ``text_encoder.<CLIP-L module>`` (diffusers' and ComfyUI's key for CLIP-L) and
``text_encoders.t5xxl.transformer.<T5 module>`` (ComfyUI's generic key for T5-XXL). ``export.py`` converts to
kohya's ``lora_unet_…`` and ComfyUI's ``diffusion_model.…`` formats. Only this module and ``export.py`` know key
names.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from peft import LoHaConfig, LoKrConfig, OFTConfig
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.loha import LoHaLayer
from peft.tuners.oft import OFTLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import dequantize_module_weight
from safetensors import SafetensorError, safe_open

from .config import LoraConfig
from .errors import TrainerInputError
from .fileio import save_safetensors, unique_path
from .models.family import FLUX1, detect_family
from .models.flux import TARGET_PRESETS

log = logging.getLogger(__name__)

PREFIX = "transformer."
CLIP_PREFIX = "text_encoder."  # diffusers' and ComfyUI's key for a CLIP-L LoRA
T5_PREFIX = "text_encoders.t5xxl.transformer."  # ComfyUI's generic text-encoder key for T5-XXL
ADAPTER = "default"

# FLUX.1's target presets live with its model; lora.TARGET_PRESETS is the name the config refers to.
# TheLastBen's small-LoRA recipe (as SimpleTuner ships it): the output projection of single blocks 7 and 20 of
# FLUX.1's 38 ("tiny"), or of block 7 only ("nano"). Other depths use the same relative positions.
SIZED_PRESETS: dict[str, tuple[int, ...]] = {"tiny": (7, 20), "nano": (7,)}
_FLUX_SINGLE_BLOCKS = 38
PRESET_NAMES = (*TARGET_PRESETS, *SIZED_PRESETS)

CLIP_TARGETS = r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
T5_TARGETS = r"encoder\.block\.\d+\.layer\.(0\.SelfAttention\.(q|k|v|o)|1\.DenseReluDense\.(wi|wi_0|wi_1|wo))"


def resolve_targets(targets: str, transformer: torch.nn.Module | None = None) -> str:
    """A preset name, or a regex over full module names (e.g. ``transformer_blocks\\.0\\.attn\\.to_q``).

    Presets are those of the family of ``transformer``, and "tiny" and "nano" depend on its depth (FLUX.1's
    presets and 38 single blocks when it is None).
    """
    family = detect_family(transformer) if transformer is not None else FLUX1
    if targets in TARGET_PRESETS:
        return family.target_presets[targets]
    if targets in SIZED_PRESETS:
        n = len(transformer.single_transformer_blocks) if transformer is not None else _FLUX_SINGLE_BLOCKS
        blocks = sorted({min(n - 1, round(i * n / _FLUX_SINGLE_BLOCKS)) for i in SIZED_PRESETS[targets]})
        return "|".join(family.single_output.format(index=i) for i in blocks)
    try:
        re.compile(targets)
    except re.error as exc:
        raise TrainerInputError(
            f"lora.targets: '{targets}' is neither a preset ({', '.join(PRESET_NAMES)}) nor a valid regex: {exc}."
        ) from exc
    return targets


def parse_pattern(text: str, field: str, kind: type) -> dict[str, int | float]:
    """``"proj_mlp=8, transformer_blocks\\.0\\..*=32"`` → {regex: value} for peft's rank/alpha patterns."""
    out: dict[str, int | float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.rpartition("=")
        try:
            if not sep or not key.strip():
                raise ValueError("no 'name=value'")
            re.compile(key.strip())
            number = kind(value.strip())
            if number <= 0:
                raise ValueError("must be > 0")
        except (ValueError, re.error) as exc:
            raise TrainerInputError(
                f"lora.{field}: '{part}' is not 'module-regex={kind.__name__}' ({exc}). "
                f"Write e.g. 'proj_mlp=8, attn\\.to_q=32'."
            ) from exc
        out[key.strip()] = number
    return out


def peft_config(cfg: LoraConfig, target_modules: str):
    """The peft config for ``cfg.algorithm``. ``lora.dropout`` is peft's LoRA dropout, LoKr/LoHa's rank dropout
    and OFT's module dropout; for OFT ``rank`` is the rotation block size."""
    ranks = parse_pattern(cfg.rank_pattern, "rank_pattern", int)
    alphas = parse_pattern(cfg.alpha_pattern, "alpha_pattern", float)
    if cfg.algorithm == "lora":
        return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=cfg.use_dora,
                              target_modules=target_modules, rank_pattern=ranks, alpha_pattern=alphas)
    if cfg.algorithm == "lokr":
        return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.dropout, decompose_factor=cfg.lokr_factor,
                          target_modules=target_modules, rank_pattern=ranks, alpha_pattern=alphas)
    if cfg.algorithm == "loha":
        return LoHaConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.dropout, target_modules=target_modules,
                          rank_pattern=ranks, alpha_pattern=alphas)
    if ranks or alphas:
        raise TrainerInputError("lora.rank_pattern / alpha_pattern: OFT has one block size for all layers; "
                                "leave the patterns empty or use algorithm lora, lokr or loha.")
    return OFTConfig(r=0, oft_block_size=cfg.rank, module_dropout=cfg.dropout, target_modules=target_modules)


def add_lora(transformer: torch.nn.Module, cfg: LoraConfig, seed: int = 0) -> list[str]:
    """Add a trainable adapter (base frozen) and return the targeted module names. With ``cfg.init_from`` the
    adapter starts from that file's weights (warm start)."""
    cfg.validate()
    pattern = resolve_targets(cfg.targets, transformer)
    transformer.requires_grad_(False)
    adapter_cfg = peft_config(cfg, pattern)
    # The adapters' random init draws from the global RNG: seed it so a run is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            transformer.add_adapter(adapter_cfg, adapter_name=ADAPTER)
        except ValueError as exc:
            if "not found in the base model" in str(exc) or "Target modules" in str(exc):
                raise TrainerInputError(
                    f"lora.targets: '{cfg.targets}' matches no linear layer of this transformer. "
                    f"Use a preset ({', '.join(PRESET_NAMES)}) or a regex over names like "
                    f"'transformer_blocks.0.attn.to_q'."
                ) from exc
            raise
    if cfg.init_from:
        from .export import to_default_format

        state, _ = read_lora_file(Path(cfg.init_from))
        warm_start(transformer, to_default_format(state, transformer), cfg.init_from)
    return list(adapter_layers(transformer))


def add_text_encoder_lora(text_encoder, cfg: LoraConfig, seed: int = 0) -> dict[str, torch.nn.Module]:
    """LoRA on CLIP-L and/or T5 of a :class:`~trainer_core.models.encoders.FluxTextEncoder` (``cfg.text_encoders``,
    own rank and alpha). Returns the adapted encoders by file prefix; the encoders' own weights stay frozen."""
    wanted = {"clip_l": ("clip_l",), "t5": ("t5",), "both": ("clip_l", "t5")}.get(cfg.text_encoders, ())
    adapted: dict[str, torch.nn.Module] = {}
    for name in wanted:
        model = text_encoder.clip_model if name == "clip_l" else text_encoder.t5_model
        model.requires_grad_(False)
        peft_cfg = PeftLoraConfig(r=cfg.text_encoder_rank, lora_alpha=cfg.text_encoder_alpha,
                                  target_modules=CLIP_TARGETS if name == "clip_l" else T5_TARGETS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + (1 if name == "clip_l" else 2))
            inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
        model.eval()  # no dropout (T5 has some): the embeddings training sees are the ones inference will see
        adapted[CLIP_PREFIX if name == "clip_l" else T5_PREFIX] = model
    return adapted


def adapter_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    """The modules carrying our adapter, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer) and ADAPTER in _adapters(m)}


def _adapters(layer: BaseTunerLayer) -> set[str]:
    found: set[str] = set()
    for attr in layer.adapter_layer_names:
        found |= set(getattr(layer, attr, {}).keys())
    return found


def adapter_parameters(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Parameter]:
    """Every trainable adapter tensor by a stable name, ``<prefix><module>.<tensor>`` (e.g. ``….lora_A.weight``,
    ``….lokr_w1``, ``….lora_magnitude_vector.weight``, ``….oft_R.weight``)."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, layer in adapter_layers(model).items():
        for pname, param in layer.named_parameters():
            parts = pname.split(".")
            if parts[0] == "base_layer" or ADAPTER not in parts:
                continue
            parts.remove(ADAPTER)
            out[f"{prefix}{name}.{'.'.join(parts)}"] = param
    return out


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in adapter_parameters(transformer).values() if p.requires_grad]


def cast_adapter_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Master weights of every adapter tensor in ``dtype``. peft creates them in the base weights' dtype (bf16
    under bf16 compute), where small updates round away; its layers cast their results back to the input dtype."""
    for param in adapter_parameters(model).values():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)


def training_state_dict(transformer: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None = None
                        ) -> dict[str, torch.Tensor]:
    """The adapters' raw tensors (fp32 copies) for checkpoints: what :func:`set_lora_state_dict` restores exactly."""
    params = adapter_parameters(transformer, PREFIX)
    for prefix, model in (text_encoders or {}).items():
        params.update(adapter_parameters(model, prefix))
    return {k: p.detach().float().cpu().clone() for k, p in params.items()}


def set_lora_state_dict(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                        text_encoders: dict[str, torch.nn.Module] | None = None) -> None:
    """Copy adapter tensors (:func:`training_state_dict`, or a LoRA file of the same targets and ranks into adapters
    with alpha = rank, since a file's scale is in its lora_B) into the existing adapters, e.g. on resume. ``.alpha``
    scalars are ignored."""
    params = adapter_parameters(transformer, PREFIX)
    for prefix, model in (text_encoders or {}).items():
        params.update(adapter_parameters(model, prefix))
    given = {k: v for k, v in state_dict.items() if not k.endswith(".alpha")}
    missing = sorted(set(params) - set(given))
    unexpected = sorted(set(given) - set(params))
    wrong = sorted(k for k in set(params) & set(given) if params[k].shape != given[k].shape)
    if missing or unexpected or wrong:
        raise TrainerInputError(
            f"adapter weights do not fit this adapter ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} of another shape, e.g. {(missing + unexpected + wrong)[:2]}). Resume with the same "
            f"algorithm, rank and targets."
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(given[key].to(param.device, param.dtype))


# ---------------------------------------------------------------------------------------------------------------
# The file


def base_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """The frozen weight under an adapter layer, dequantized (nf4/int8/fp8) to fp32."""
    return dequantize_module_weight(layer.get_base_layer()).detach().float()


def lora_delta(layer: BaseTunerLayer) -> torch.Tensor:
    """The fp32 weight delta [out, in] the adapter adds to its base weight (what merging would add)."""
    if isinstance(layer, LoraLayer):
        a = layer.lora_A[ADAPTER].weight.detach().float()
        b = layer.lora_B[ADAPTER].weight.detach().float()
        delta = layer.scaling[ADAPTER] * (b @ a)
        if layer.use_dora[ADAPTER]:
            w = base_weight(layer).to(delta.device)
            merged = w + delta
            magnitude = layer.lora_magnitude_vector[ADAPTER].weight.detach().float().to(delta.device)
            delta = merged * (magnitude / merged.norm(dim=1).clamp_min(1e-12)).unsqueeze(1) - w
        return delta
    if isinstance(layer, OFTLayer):
        w = base_weight(layer)
        rotation = layer.get_delta_weight(ADAPTER).float().to(w.device)
        return w @ rotation.T - w  # peft's merge: W' = (R Wᵀ)ᵀ
    return layer.get_delta_weight(ADAPTER).float()  # LoKr, LoHa: already scaled


def _dora_scale(layer: LoraLayer) -> torch.Tensor:
    """ComfyUI's ``dora_scale`` [out, 1] for a peft DoRA layer.

    peft: W' = m / ‖W + ΔW‖ · (W + ΔW) (row norms). ComfyUI, for a scale with one entry per output row, divides by
    the row norms of the *base* weight instead: W' = d / ‖W‖ · (W + ΔW). So d = m · ‖W‖ / ‖W + ΔW‖.
    """
    a = layer.lora_A[ADAPTER].weight.detach().float()
    b = layer.lora_B[ADAPTER].weight.detach().float()
    w = base_weight(layer).to(a.device)
    magnitude = layer.lora_magnitude_vector[ADAPTER].weight.detach().float()
    merged_norm = (w + layer.scaling[ADAPTER] * (b @ a)).norm(dim=1).clamp_min(1e-12)  # all-zero rows stay zero
    return (magnitude * w.norm(dim=1) / merged_norm).unsqueeze(1)


def layer_tensors(layer: BaseTunerLayer) -> dict[str, torch.Tensor]:
    """One layer's tensors in the default file format (suffix → tensor), so that ComfyUI computes peft's delta."""
    if isinstance(layer, LoraLayer):
        up = layer.lora_B[ADAPTER].weight.detach()
        # peft's scaling, whatever produced it (alpha / rank, alpha_pattern, rsLoRA), goes into lora_B; alpha = rank
        # then means scale 1 to every reader, including those that ignore alpha (see the module docstring).
        out = {"lora_A.weight": layer.lora_A[ADAPTER].weight.detach(),
               "lora_B.weight": (up.float() * layer.scaling[ADAPTER]).to(up.dtype),
               "alpha": torch.tensor(float(layer.r[ADAPTER]))}
        if layer.use_dora[ADAPTER]:
            out["dora_scale"] = _dora_scale(layer)
        return out
    if isinstance(layer, LoKrLayer):
        out = {name: getattr(layer, name)[ADAPTER].detach() for name in layer.adapter_layer_names
               if ADAPTER in getattr(layer, name)}
        scale = layer.scaling[ADAPTER]
        # ComfyUI scales by alpha / (rank of the last factorised matrix), or by 1 when neither is factorised.
        factor = out.get("lokr_w2_b", out.get("lokr_w1_b"))
        if factor is not None:
            out["alpha"] = torch.tensor(float(scale * factor.shape[0]))
        else:
            out["lokr_w1"] = out["lokr_w1"] * scale
        return out
    if isinstance(layer, LoHaLayer):
        out = {name: getattr(layer, name)[ADAPTER].detach() for name in layer.adapter_layer_names
               if ADAPTER in getattr(layer, name)}
        out["alpha"] = torch.tensor(float(layer.scaling[ADAPTER] * out["hada_w1_b"].shape[0]))
        return out
    return {"diff": lora_delta(layer)}


def lora_state_dict(transformer: torch.nn.Module, dtype: torch.dtype | None = None,
                    text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """The adapters in the default file format: ``transformer.<module>.<tensor>`` (+ text-encoder prefixes)."""
    out: dict[str, torch.Tensor] = {}
    models = {PREFIX: transformer, **(text_encoders or {})}
    for prefix, model in models.items():
        for name, layer in adapter_layers(model).items():
            if prefix == CLIP_PREFIX and not name.startswith("text_model."):
                name = f"text_model.{name}"  # transformers 5 dropped CLIPTextModel's text_model level; files keep it
            for suffix, tensor in layer_tensors(layer).items():
                tensor = tensor.detach().cpu()
                if dtype is not None and suffix != "alpha":
                    tensor = tensor.to(dtype)
                out[f"{prefix}{name}.{suffix}"] = tensor.contiguous()
    return out


def save_lora(
    path: Path,
    transformer: torch.nn.Module,
    metadata: dict[str, str],
    overwrite: bool = False,
    dtype: torch.dtype | None = torch.bfloat16,
    text_encoders: dict[str, torch.nn.Module] | None = None,
    fmt: str = "default",
) -> Path:
    """Write the adapter file atomically in format ``fmt`` ("default", "kohya" or "comfy"); an existing file is
    kept (a numbered name is used) unless ``overwrite``."""
    path = Path(path)
    if not overwrite:
        path = unique_path(path)
    meta = {k: str(v) for k, v in metadata.items()}
    state = lora_state_dict(transformer, None, text_encoders)
    if fmt == "default" and not detect_family(transformer).lora_alpha_tensors:
        # a LoRA's alpha is its rank (scale 1, see the module docstring): leaving it out changes no reader's result
        state = {k: v for k, v in state.items()
                 if not (k.endswith(".alpha") and f"{k[:-len('alpha')]}lora_A.weight" in state)}
    if fmt != "default":
        from .export import convert

        state = convert(state, transformer, fmt, text_encoders)
    if dtype is not None:
        state = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in state.items()}
    if any(k.endswith(".diff") for k in state):
        size = sum(v.numel() * v.element_size() for v in state.values())
        log.warning("OFT is saved as full weight deltas (ComfyUI has no matching compact OFT format): %.1f MB",
                    size / 2**20)
    save_safetensors(state, path, meta)
    log.info("saved %s adapter to %s", fmt, path)
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


def warm_start(transformer: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Start a LoRA/DoRA adapter from a LoRA in the default format, with the same effective delta per module.

    The file's alpha/rank may differ from the adapter's: lora_B is rescaled. Modules of the adapter missing from
    the file keep their fresh init (logged); modules in the file the adapter does not target are an error.
    """
    layers = adapter_layers(transformer)
    modules = {k[len(PREFIX):].rsplit(".", 2)[0] for k in state if k.startswith(PREFIX) and ".lora_" in k}
    if not modules or any(not isinstance(layer, LoraLayer) for layer in layers.values()):
        raise TrainerInputError(
            f"lora.init_from: '{source}' holds no LoRA weights for the transformer, or the algorithm is not lora. "
            f"Warm start needs a LoRA file and lora.algorithm = 'lora'."
        )
    extra = sorted(modules - set(layers))
    if extra:
        raise TrainerInputError(
            f"lora.init_from: '{source}' has weights for {len(extra)} layers these targets leave out (e.g. "
            f"{extra[0]}). Set lora.targets to cover them (e.g. 'all+ffs', or the file's own targets)."
        )
    uses_dora = any(layer.use_dora[ADAPTER] for layer in layers.values())
    if not uses_dora and any(k.endswith(".dora_scale") for k in state):
        log.warning("warm start: %s is a DoRA file; with lora.use_dora off only its LoRA part is used", source)
    fresh = sorted(set(layers) - modules)
    if fresh:
        log.info("warm start: %d targeted layers are not in %s and start fresh (e.g. %s)", len(fresh), source, fresh[0])
    with torch.no_grad():
        for name in sorted(modules):
            layer = layers[name]
            a = state[f"{PREFIX}{name}.lora_A.weight"].float()
            b = state[f"{PREFIX}{name}.lora_B.weight"].float()
            if a.shape[0] != layer.r[ADAPTER]:
                raise TrainerInputError(
                    f"lora.init_from: '{source}' has rank {a.shape[0]} at {name}, the adapter rank "
                    f"{layer.r[ADAPTER]}. Set lora.rank (or rank_pattern) to the file's rank."
                )
            alpha = state.get(f"{PREFIX}{name}.alpha")
            file_scale = float(alpha) / a.shape[0] if alpha is not None else 1.0
            b = b * (file_scale / layer.scaling[ADAPTER])
            layer.lora_A[ADAPTER].weight.copy_(a)
            layer.lora_B[ADAPTER].weight.copy_(b)
            if layer.use_dora[ADAPTER]:
                w = base_weight(layer)
                merged_norm = (w + layer.scaling[ADAPTER] * (b @ a).to(w.device)).norm(dim=1)
                dora = state.get(f"{PREFIX}{name}.dora_scale")
                # No DoRA in the file: magnitude = ‖W + ΔW‖ keeps its delta; else invert _dora_scale.
                magnitude = (merged_norm if dora is None
                             else dora.float().flatten() * merged_norm / w.norm(dim=1).clamp_min(1e-12))
                layer.lora_magnitude_vector[ADAPTER].weight.copy_(magnitude)
    log.info("warm start from %s: %d layers", source, len(modules))
