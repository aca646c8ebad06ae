"""Optimizer and learning-rate schedule factories.

Names are the ones users carry between trainers (``train.optimizer``): AdamW (torch), AdamW8bit, Lion8bit and
PagedAdamW8bit (bitsandbytes), Adafactor (transformers, fixed learning rate: ``relative_step``,
``scale_parameter`` and ``warmup_init`` off unless ``optimizer_args`` turns them on) and Prodigy (prodigyopt,
usually with ``learning_rate = 1``). Parameter groups carry their own learning rate (transformer vs text
encoders); a schedule scales every group by the same factor.
"""

from __future__ import annotations

import ast
import inspect
import logging
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from .config import TrainConfig
from .errors import TrainerInputError

log = logging.getLogger(__name__)

# Adafactor with a fixed learning rate, as FLUX LoRA recipes use it (kohya, ai-toolkit, SimpleTuner).
ADAFACTOR_DEFAULTS = {"relative_step": False, "scale_parameter": False, "warmup_init": False}


def _optimizer_class(name: str):
    if name == "adamw":
        return torch.optim.AdamW
    if name in ("adamw8bit", "lion8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        return {"adamw8bit": bnb.optim.AdamW8bit, "lion8bit": bnb.optim.Lion8bit,
                "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    raise TrainerInputError(f"train.optimizer: unknown optimizer '{name}'.")


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """``"d_coef=2, safeguard_warmup=True, betas=(0.9, 0.99)"`` → keyword arguments (Python literals only)."""
    args: dict[str, Any] = {}
    if not text.strip():
        return args
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise SyntaxError("positional value")
        for kw in call.keywords:
            if kw.arg is None:
                raise SyntaxError("'**' is not allowed")
            args[kw.arg] = ast.literal_eval(kw.value)
    except (SyntaxError, ValueError) as exc:
        raise TrainerInputError(
            f"train.optimizer_args: '{text}' is not a list of name=value pairs ({exc}). "
            f"Write e.g. 'd_coef=2, safeguard_warmup=True'."
        ) from exc
    return args


def optimizer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments for ``cfg.optimizer`` (besides params and lr): weight decay, betas, eps, extra args."""
    kwargs: dict[str, Any] = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adafactor":
        kwargs.update(ADAFACTOR_DEFAULTS)
    if cfg.betas:
        kwargs["betas"] = tuple(cfg.betas)
    if cfg.eps:
        kwargs["eps"] = cfg.eps
    kwargs.update(parse_optimizer_args(cfg.optimizer_args))
    return kwargs


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params``: a list of parameters, or of param-group dicts (each may set
    its own ``lr``; groups without one use ``cfg.learning_rate``)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "lr": g.get("lr") or cfg.learning_rate} for g in params]
    else:
        groups = [{"params": params, "lr": cfg.learning_rate}]
    groups = [g for g in groups if g["params"]]
    cls = _optimizer_class(cfg.optimizer)
    kwargs = optimizer_kwargs(cfg)
    lr = cfg.learning_rate
    if _relative_step(cfg):
        log.info("Adafactor with relative_step sets its own step size; train.learning_rate is not used")
        lr = None
        groups = [{**g, "lr": None} for g in groups]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        names = ", ".join(p for p in accepted if p not in ("self", "params", "lr"))
        raise TrainerInputError(
            f"train.optimizer_args: {cfg.optimizer} does not take {', '.join(unknown)}; it takes: {names}."
        )
    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainerInputError(f"train.optimizer: {cfg.optimizer} refused its settings {kwargs}: {exc}") from exc
    log.info("optimizer: %s(%s), learning rates %s", type(optimizer).__name__,
             ", ".join(f"{k}={v}" for k, v in kwargs.items()), [g["lr"] for g in groups])
    return optimizer


def _relative_step(cfg: TrainConfig) -> bool:
    return cfg.optimizer == "adafactor" and bool(parse_optimizer_args(cfg.optimizer_args).get("relative_step"))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedules: constant, constant_with_warmup, cosine, cosine_with_restarts (``scheduler_cycles``
    restarts), polynomial (``scheduler_power``, down to 1e-7) and linear, each after ``warmup_steps``.

    Adafactor with ``relative_step=True`` schedules itself: its own schedule object reports the step size."""
    if _relative_step(cfg):
        if cfg.scheduler != "constant" or cfg.warmup_steps:
            raise TrainerInputError(
                f"train.scheduler: Adafactor with relative_step=True sets its own schedule; '{cfg.scheduler}' "
                f"(warmup {cfg.warmup_steps}) would not be used. Set scheduler = 'constant' and warmup_steps = 0, "
                f"or drop relative_step from optimizer_args."
            )
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    return get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.steps,
        num_cycles=cfg.scheduler_cycles,
        power=cfg.scheduler_power,
    )
