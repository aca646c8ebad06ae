"""The adapter file in other layouts ComfyUI loads, and back (for warm starts from such files).

* ``kohya``: sd-scripts' FLUX names — ``lora_unet_<BFL module with _>`` with ``lora_down.weight`` /
  ``lora_up.weight`` / ``alpha``; CLIP-L ``lora_te1_<module with _>``, T5 ``lora_te3_<module with _>``.
* ``comfy``: ComfyUI's own names — ``diffusion_model.<BFL module>`` (same tensor names as kohya);
  ``text_encoders.clip_l.transformer.<module>`` and ``text_encoders.t5xxl.transformer.<module>``.

Both use the original BFL layout, where q, k, v (and in single blocks the MLP input) are one fused weight. A
fused LoRA stacks the parts' down matrices and places their up matrices block-diagonally, so the fused delta is
exactly the parts' deltas stacked (rank = sum of the parts' ranks). LoKr and LoHa deltas do not stack into one
Kronecker / Hadamard product, so those algorithms are written in the default format only when a fused weight is
targeted. OFT (saved as full ``diff`` deltas) stacks its deltas.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from .errors import TrainerInputError
from .lora import CLIP_PREFIX, PREFIX, T5_PREFIX, base_weight

log = logging.getLogger(__name__)

FORMATS = ("default", "kohya", "comfy")
_UNET = {"kohya": "lora_unet_", "comfy": "diffusion_model."}
_TEXT = {"kohya": {CLIP_PREFIX: "lora_te1_", T5_PREFIX: "lora_te3_"},
         "comfy": {CLIP_PREFIX: "text_encoders.clip_l.transformer.", T5_PREFIX: "text_encoders.t5xxl.transformer."}}
_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_SUFFIX_BACK = {v: k for k, v in _SUFFIX.items()}
_KNOWN_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "alpha", "dora_scale",
                   "diff", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b",
                   "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _split_key(key: str) -> tuple[str, str]:
    for suffix in _KNOWN_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise TrainerInputError(f"LoRA key '{key}' has no known tensor name ({', '.join(_KNOWN_SUFFIXES)}).")


class FluxLayout:
    """Which diffusers modules of a FLUX transformer make up each BFL weight, and at which rows."""

    def __init__(self, transformer: torch.nn.Module):
        from .models.family import detect_family

        diffusers_module_to_bfl = detect_family(transformer).diffusers_module_to_bfl
        cfg = transformer.config
        width = cfg.num_attention_heads * cfg.attention_head_dim
        self.transformer = transformer
        self.parts: dict[str, list[tuple[str, slice | None]]] = defaultdict(list)
        self.bfl_of: dict[str, tuple[str, slice | None]] = {}
        for name, _ in transformer.named_modules():
            try:
                bfl, rows = diffusers_module_to_bfl(name, inner_dim=width)
            except ValueError:  # not a mapped weight (containers, adapter internals, norm_out)
                continue
            self.parts[bfl].append((name, rows))
            self.bfl_of[name] = (bfl, rows)
        for parts in self.parts.values():
            parts.sort(key=lambda p: p[1].start if p[1] is not None else 0)

    def fused(self, bfl: str) -> bool:
        return self.parts[bfl][0][1] is not None

    def rows(self, bfl: str) -> int:
        return self.parts[bfl][-1][1].stop

    def base_weight(self, module: str) -> torch.Tensor:
        layer = self.transformer.get_submodule(module)
        if hasattr(layer, "get_base_layer"):
            return base_weight(layer)
        return layer.weight.detach().float()


def _group(state: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        if key.startswith(prefix):
            module, suffix = _split_key(key[len(prefix):])
            groups[module][suffix] = value
    return groups


def convert(state: dict[str, torch.Tensor], transformer: torch.nn.Module, fmt: str,
            text_encoders: dict | None = None) -> dict[str, torch.Tensor]:
    """A default-format state dict (:func:`lora.lora_state_dict`) in ``fmt`` ("kohya" or "comfy")."""
    if fmt not in _UNET:
        raise TrainerInputError(f"lora.export_formats: '{fmt}' is not one of {', '.join(_UNET)}.")
    layout = FluxLayout(transformer)
    out: dict[str, torch.Tensor] = {}
    by_bfl: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
    for module, tensors in _group(state, PREFIX).items():
        if module not in layout.bfl_of:
            raise TrainerInputError(f"LoRA module '{module}' has no BFL counterpart; it cannot be written as {fmt}.")
        by_bfl[layout.bfl_of[module][0]][module] = tensors
    for bfl, modules in by_bfl.items():
        name = _UNET[fmt] + (bfl.replace(".", "_") if fmt == "kohya" else bfl)
        tensors = _fuse(layout, bfl, modules, fmt) if layout.fused(bfl) else next(iter(modules.values()))
        out.update({f"{name}.{_SUFFIX.get(s, s)}": t for s, t in tensors.items()})
    for prefix, target in _TEXT[fmt].items():
        for module, tensors in _group(state, prefix).items():
            name = target + (module.replace(".", "_") if fmt == "kohya" else module)
            out.update({f"{name}.{_SUFFIX.get(s, s)}": t for s, t in tensors.items()})
    return out


def _fuse(layout: FluxLayout, bfl: str, modules: dict[str, dict[str, torch.Tensor]], fmt: str
          ) -> dict[str, torch.Tensor]:
    kinds = {frozenset(t) - {"alpha", "dora_scale"} for t in modules.values()}
    if kinds == {frozenset({"diff"})}:
        first = next(iter(modules.values()))["diff"]
        diff = first.new_zeros(layout.rows(bfl), first.shape[1])
        for module, rows in layout.parts[bfl]:
            if module in modules:
                diff[rows] = modules[module]["diff"]
        return {"diff": diff}
    if kinds != {frozenset({"lora_A.weight", "lora_B.weight"})}:
        raise TrainerInputError(
            f"lora.export_formats: the {fmt} format fuses q, k and v into '{bfl}'; LoKr and LoHa adapters on those "
            f"layers cannot be fused. Use the default format (it loads in ComfyUI), or LoRA."
        )
    parts = [(m, rows, modules[m]) for m, rows in layout.parts[bfl] if m in modules]
    scales = [float(t["alpha"]) / t["lora_A.weight"].shape[0] for _, _, t in parts]
    total_rank = sum(t["lora_A.weight"].shape[0] for _, _, t in parts)
    # One alpha for the fused weight: keep the parts' common scale, else fold each part's scale into its up rows.
    common = scales[0] if all(s == scales[0] for s in scales) else 1.0
    down = torch.cat([t["lora_A.weight"].float() for _, _, t in parts])
    up = torch.zeros(layout.rows(bfl), total_rank)
    col = 0
    for (_, rows, t), scale in zip(parts, scales):
        rank = t["lora_A.weight"].shape[0]
        up[rows, col:col + rank] = t["lora_B.weight"].float() * (scale / common)
        col += rank
    out = {"lora_A.weight": down, "lora_B.weight": up, "alpha": torch.tensor(common * total_rank)}
    if any("dora_scale" in t for _, _, t in parts):
        # DoRA rescales rows; rows of parts without an adapter keep their weight: scale = their own row norm.
        dora = torch.zeros(layout.rows(bfl), 1)
        for module, rows in layout.parts[bfl]:
            if module in modules and "dora_scale" in modules[module]:
                dora[rows] = modules[module]["dora_scale"].float()
            else:
                dora[rows] = layout.base_weight(module).norm(dim=1, keepdim=True).cpu()
        out["dora_scale"] = dora
    return out


def to_default_format(state: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer part of a LoRA file in any of the three formats, in the default format.

    Fused BFL weights are split back per diffusers module: each part keeps the down rows its up block uses, so a
    file written by :func:`convert` comes back exactly, and kohya's own fused LoRAs (one shared down matrix)
    come back at their full rank. Text-encoder tensors are left out.
    """
    if any(k.startswith(PREFIX) for k in state):
        return {k: v for k, v in state.items() if k.startswith(PREFIX)}
    layout = FluxLayout(transformer)
    names = {**{_UNET["kohya"] + bfl.replace(".", "_"): bfl for bfl in layout.parts},
             **{_UNET["comfy"] + bfl: bfl for bfl in layout.parts}}
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    skipped = 0
    for key, value in state.items():
        module, suffix = _split_key(key)
        if module not in names:
            if any(module.startswith(p) for p in ("lora_te", "text_encoder")):
                skipped += 1
                continue
            raise TrainerInputError(
                f"LoRA key '{key}' is not a FLUX.1 transformer layer of this model (expected 'transformer.…', "
                f"'lora_unet_…' or 'diffusion_model.…' names). Is it a LoRA for another model?"
            )
        groups[names[module]][_SUFFIX_BACK.get(suffix, suffix)] = value
    if skipped:
        log.info("warm start: %d text-encoder tensors in the file are not used", skipped)
    out: dict[str, torch.Tensor] = {}
    for bfl, tensors in groups.items():
        if "lora_A.weight" not in tensors:
            raise TrainerInputError(f"warm start needs LoRA weights; '{bfl}' has {sorted(tensors)}.")
        down, up = tensors["lora_A.weight"].float(), tensors["lora_B.weight"].float()
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])
        scale = alpha / down.shape[0]
        for module, rows in layout.parts[bfl]:
            part_up = up if rows is None else up[rows]
            cols = part_up.abs().sum(0) > 0 if rows is not None else torch.ones(up.shape[1], dtype=torch.bool)
            if not cols.any():
                continue  # a part of the fused weight without an adapter
            rank = int(cols.sum())
            out[f"{PREFIX}{module}.lora_A.weight"] = down[cols]
            out[f"{PREFIX}{module}.lora_B.weight"] = part_up[:, cols]
            out[f"{PREFIX}{module}.alpha"] = torch.tensor(scale * rank)
            if "dora_scale" in tensors:
                dora = tensors["dora_scale"].float()
                out[f"{PREFIX}{module}.dora_scale"] = dora if rows is None else dora[rows]
    return out
