"""Atomic save and exact resume of the whole training state, in safetensors only.

One checkpoint is one file ``step_NNNNNN.safetensors`` holding the LoRA (portable format, fp32), the
optimizer's tensors, the RNG states and, in its metadata, everything else as JSON: step, scheduler state,
the optimizer's scalar state and param groups, the losses so far and the settings the run must keep.
A pickle-free format means a checkpoint from anywhere can be opened without running its code.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import TrainerInputError
from .fileio import save_safetensors

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{6,})\.safetensors$")


@dataclass
class TrainingState:
    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    losses: list[float]
    fingerprint: dict[str, Any]  # settings that must match to resume (targets, rank, data, …)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # EMA of the adapter weights (train.ema_decay)


def _split_tensors(tree: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Move every tensor of a nested dict into ``tensors`` (keys joined with '/'); return the JSON-able rest.

    Optimizer states nest (bitsandbytes keeps its quantisation state in a sub-dict), so this recurses.
    """
    rest: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if torch.is_tensor(value):
            tensors[name] = value
        elif isinstance(value, dict):
            rest[str(key)] = _split_tensors(value, name, tensors)
        else:
            rest[str(key)] = value
    return rest


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars = _split_tensors(state_dict["state"], "optimizer", tensors)
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, Any] = json.loads(json.dumps(meta["scalars"]))
    for name, value in tensors.items():
        *parents, leaf = name.split("/")[1:]
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {"state": {int(pid): values for pid, values in state.items()}, "param_groups": meta["param_groups"]}


def _store_shared_once(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write, and ``{name: stored name}`` for each tensor that is another one under a second name.

    safetensors refuses tensors that share memory, and bitsandbytes' 8-bit optimizers give every parameter the
    same ``qmap1``/``qmap2`` tensors. Each distinct tensor is stored once and its other names are recorded, so
    loading gives back one tensor under all its names, as the optimizer had it. A view that only overlaps
    another one is stored as its own copy (same values, no sharing to restore).
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    used_storages: set[tuple] = set()
    for name, tensor in tensors.items():
        if tensor.numel() == 0:  # owns no memory, so shares none
            stored[name] = tensor
            continue
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if view in first_name:
            aliases[name] = first_name[view]
            continue
        if storage in used_storages:
            tensor = tensor.clone()
        else:
            used_storages.add(storage)
        first_name[view] = name
        stored[name] = tensor
    return stored, aliases


def save_checkpoint(folder: Path, state: TrainingState, keep: int) -> Path:
    """Write ``step_NNNNNN.safetensors`` atomically into ``folder``; keep only the newest ``keep``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
    tensors = {f"lora.{k}": v.float() for k, v in state.lora.items()}
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    tensors.update({f"ema.{k}": v for k, v in state.ema.items()})
    tensors, aliases = _store_shared_once(tensors)
    meta = {
        "format": "flux-lora-trainer-checkpoint/1",
        "step": str(state.step),
        "optimizer": json.dumps(opt_meta),
        "scheduler": json.dumps(state.scheduler),
        "losses": json.dumps(state.losses),
        "fingerprint": json.dumps(state.fingerprint, sort_keys=True),
        "shared_tensors": json.dumps(aliases, sort_keys=True),
    }
    path = save_safetensors(tensors, folder / f"step_{state.step:06d}.safetensors", meta)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    log.info("checkpoint saved: %s", path)
    return path


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where :func:`save_checkpoint` puts the checkpoint of ``step``."""
    return Path(folder) / f"step_{step:06d}.safetensors"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> TrainingState:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "flux-lora-trainer-checkpoint/1":
                raise TrainerInputError(f"'{path}' is not a checkpoint written by this trainer.")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            for name, stored in json.loads(meta.get("shared_tensors", "{}")).items():
                tensors[name] = tensors[stored]
    except (SafetensorError, OSError) as exc:
        raise TrainerInputError(
            f"checkpoint '{path}' is damaged ({exc}). Delete it to resume from the previous one."
        ) from exc
    group = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return TrainingState(
        step=int(meta["step"]),
        lora=group("lora."),
        optimizer=_unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optimizer/")},
                                       json.loads(meta["optimizer"])),
        scheduler=json.loads(meta["scheduler"]),
        rng=group("rng."),
        losses=json.loads(meta["losses"]),
        fingerprint=json.loads(meta["fingerprint"]),
        ema=group("ema."),
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path,
                      resumable: tuple[str, ...] = ()) -> list[str]:
    """Refuse to resume a run whose settings changed in a way that would change what the run is; the message
    names each such setting. Settings in ``resumable`` (dotted names such as ``train.learning_rate``) may
    change: they are returned as ``"name: old → new"`` for the caller to report."""
    # Checkpoints from before multi-process training have no "processes": they come from one process.
    saved_n, current_n = saved.get("processes", 1), current.get("processes", 1)
    if saved_n != current_n:
        raise TrainerInputError(
            f"cannot resume from '{path}': it was written by a run on {saved_n} process(es) and this run has "
            f"{current_n}. The global batch and the data each process trains on depend on that number, so resume "
            f"on {saved_n} (torchrun --nproc-per-node / --nnodes, or accelerate launch --num_processes) or start a "
            f"new run (turn resume off or use a new output name)."
        )
    old, new = (_flatten({k: v for k, v in d.items() if k != "processes"}) for d in (saved, current))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    refused = [k for k in changed if k not in resumable]
    if refused:
        details = ", ".join(f"{k} ({_short(old.get(k))} → {_short(new.get(k))})" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise TrainerInputError(
            f"cannot resume from '{path}': settings changed: {details}{more}. Restore them, or start a new run "
            f"(resume off, or a new output name)."
        )
    return [f"{k}: {_short(old.get(k))} → {_short(new.get(k))}" for k in changed]
