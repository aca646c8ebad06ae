"""Optimizers and schedules: every name builds the optimizer it says, with the settings given, and a schedule of
the shape its name promises; the options reach a real training session and resume exactly."""

import bitsandbytes as bnb
import pytest
import torch
from prodigyopt import Prodigy
from transformers.optimization import Adafactor

from trainer_core import checkpoint as ckpt
from trainer_core import lora
from trainer_core.config import OPTIMIZERS, SCHEDULERS, LoraConfig, TrainConfig
from trainer_core.errors import TrainerInputError
from trainer_core.models.tiny import build_tiny_transformer
from trainer_core.optim import build_optimizer, build_scheduler
from trainer_core.train import TrainingSession, train_lora


def _param():
    return torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))


def _step(opt, param):
    param.grad = torch.ones_like(param)
    opt.step()
    return opt.state[param]


# name → (class, a state entry only that optimizer family keeps)
EXPECTED = {
    "adamw": (torch.optim.AdamW, "exp_avg_sq"),
    "adamw8bit": (bnb.optim.AdamW8bit, "state2"),
    "lion8bit": (bnb.optim.Lion8bit, "state1"),
    "paged_adamw8bit": (bnb.optim.PagedAdamW8bit, "state2"),
    "adafactor": (Adafactor, "exp_avg_sq_row"),  # factored second moment
    "prodigy": (Prodigy, "s"),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_name_builds_that_optimizer(name):
    param = _param()
    opt = build_optimizer([param], TrainConfig(optimizer=name, learning_rate=0.5))
    cls, state_key = EXPECTED[name]
    assert type(opt) is cls
    assert state_key in _step(opt, param)
    assert opt.param_groups[0]["lr"] == 0.5


def test_8bit_optimizers_keep_8bit_state_and_lion_keeps_one_moment():
    for name, moments in (("adamw8bit", 2), ("lion8bit", 1), ("paged_adamw8bit", 2)):
        param = _param()
        state = _step(build_optimizer([param], TrainConfig(optimizer=name)), param)
        assert state["state1"].dtype == torch.uint8
        assert ("state2" in state) == (moments == 2)
    paged = build_optimizer([_param()], TrainConfig(optimizer="paged_adamw8bit"))
    assert paged.is_paged and not build_optimizer([_param()], TrainConfig(optimizer="adamw8bit")).is_paged


def test_adafactor_uses_the_fixed_learning_rate():
    param = _param()
    opt = build_optimizer([param], TrainConfig(optimizer="adafactor", learning_rate=3e-4))
    group = opt.param_groups[0]
    assert not group["relative_step"] and not group["scale_parameter"] and not group["warmup_init"]
    before = param.detach().clone()
    _step(opt, param)
    # update = lr · (clipped) normalised gradient: with a constant gradient every entry moves by exactly lr
    assert torch.allclose(before - param.detach(), torch.full_like(before, 3e-4), atol=1e-6)


def test_betas_eps_weight_decay_and_optimizer_args_reach_the_optimizer():
    cfg = TrainConfig(optimizer="adamw", betas=[0.8, 0.95], eps=1e-6, weight_decay=0.02)
    group = build_optimizer([_param()], cfg).param_groups[0]
    assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.02)
    prodigy = build_optimizer([_param()], TrainConfig(optimizer="prodigy", learning_rate=1.0,
                                                      optimizer_args="d_coef=2.5, safeguard_warmup=True"))
    assert prodigy.param_groups[0]["d_coef"] == 2.5 and prodigy.param_groups[0]["safeguard_warmup"] is True
    ada = build_optimizer([_param()], TrainConfig(optimizer="adafactor", optimizer_args="beta1=0.9, clip_threshold=2.0",
                                                  learning_rate=1e-3))
    assert ada.param_groups[0]["beta1"] == 0.9 and ada.param_groups[0]["clip_threshold"] == 2.0


def test_per_group_learning_rates():
    a, b = _param(), _param()
    opt = build_optimizer([{"params": [a]}, {"params": [b], "lr": 1e-5}], TrainConfig(learning_rate=1e-3))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-5]


@pytest.mark.parametrize("cfg,message", [
    (dict(optimizer="adamw", optimizer_args="d_coef=2"), "adamw does not take d_coef"),
    (dict(optimizer="adamw", optimizer_args="not valid ("), "name=value"),
    (dict(optimizer="adafactor", betas=[0.9, 0.99]), "train.betas: Adafactor"),
    (dict(optimizer="lion8bit", eps=1e-8), "train.eps"),
    (dict(betas=[0.9]), "train.betas"),
    (dict(optimizer="sgd"), "train.optimizer"),
    (dict(scheduler="warm"), "train.scheduler"),
])
def test_bad_optimizer_settings_name_the_field(cfg, message):
    with pytest.raises(TrainerInputError, match=message):
        build_optimizer([_param()], TrainConfig(**cfg).validate())


def _curve(name, **kw):
    opt = torch.optim.SGD([_param()], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(scheduler=name, steps=100, **kw))
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_schedules_have_the_shape_their_names_promise():
    assert set(_curve("constant")) == {1.0}
    warm = _curve("constant_with_warmup", warmup_steps=10)
    assert warm[0] == 0 and warm[5] == 0.5 and set(warm[10:]) == {1.0}
    cosine = _curve("cosine")
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5, abs=0.02) and cosine[-1] < 0.01
    assert all(x >= y for x, y in zip(cosine, cosine[1:]))
    restarts = _curve("cosine_with_restarts", scheduler_cycles=2)
    assert restarts[49] < 0.01 and restarts[50] == 1.0  # hard restart at half way
    linear = _curve("linear")
    assert linear[50] == pytest.approx(0.5) and linear[-1] == pytest.approx(0.01)
    square = _curve("polynomial", scheduler_power=2.0)
    assert square[50] == pytest.approx(0.25, abs=1e-3) and _curve("polynomial")[50] == pytest.approx(0.5, abs=1e-3)
    assert set(SCHEDULERS) == {"constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "polynomial",
                               "linear"}


def test_training_session_uses_the_configured_optimizer_and_schedule(sample_cache):
    cfg = TrainConfig(optimizer="prodigy", learning_rate=1.0, betas=[0.9, 0.99], weight_decay=0.01,
                      scheduler="linear", steps=4, compute_dtype="fp32")
    session = TrainingSession(build_tiny_transformer(seed=0), sample_cache, LoraConfig(rank=2, alpha=2), cfg,
                              device="cpu")
    assert type(session.optimizer) is Prodigy
    assert tuple(session.optimizer.param_groups[0]["betas"]) == (0.9, 0.99)
    session.step()
    assert session.lr == pytest.approx(0.75)  # linear decay over 4 steps
    assert "s" in session.optimizer.state[session.params[0]]  # Prodigy's own state (its step-size estimate)


@pytest.mark.parametrize("optimizer", ["prodigy", "adafactor", "lion8bit"])
def test_resume_is_exact_for_every_optimizer_family(sample_cache, tmp_path, optimizer, stop_at):
    cfg = TrainConfig(steps=6, optimizer=optimizer, learning_rate=1.0 if optimizer == "prodigy" else 1e-3,
                      compute_dtype="fp32", checkpoint_every=3, timestep_sampling="sigmoid", seed=3,
                      scheduler="cosine_with_restarts", scheduler_cycles=2, ema_decay=0.9)

    def run(folder, **kw):
        model = build_tiny_transformer(seed=0)
        result = train_lora(model, sample_cache, lora_cfg=LoraConfig(rank=4, alpha=4), train_cfg=cfg,
                            output_dir=folder, output_name="r", device="cpu", **kw)
        return model, result

    full_model, full = run(tmp_path / "full")

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", callbacks=stop_at(3))
    assert ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints" / "r").name == "step_000003.safetensors"
    resumed_model, resumed = run(tmp_path / "split", resume=True)
    assert resumed.resumed_from == 3 and resumed.losses == full.losses
    a, b = lora.lora_state_dict(full_model), lora.lora_state_dict(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_full, _ = lora.read_lora_file(full.extra_files[0])
    ema_resumed, _ = lora.read_lora_file(resumed.extra_files[0])
    assert all(torch.equal(ema_full[k], ema_resumed[k]) for k in ema_full)  # the EMA resumed exactly too


def test_adafactor_relative_step_schedules_itself():
    param = _param()
    cfg = TrainConfig(optimizer="adafactor", optimizer_args="relative_step=True, warmup_init=True")
    opt = build_optimizer([param], cfg)
    sched = build_scheduler(opt, cfg)
    _step(opt, param)
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-6)  # warmup_init: 1e-6·step, not train.learning_rate
    with pytest.raises(TrainerInputError, match="own schedule"):
        build_scheduler(opt, TrainConfig(optimizer="adafactor", optimizer_args="relative_step=True",
                                         scheduler="cosine"))
