"""FLUX LoRA Options: every widget reaches the training session; bad values are refused with the widget's name."""

import importlib

import pytest

from test_nodes import PACK, load_pack


@pytest.fixture(scope="module")
def options():
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.options")


def widgets(**changes):
    values = dict(targets="attention+ffs", targets_regex="", algorithm="lora", use_dora=False, lokr_factor=-1,
                  rank_pattern="", alpha_pattern="", init_from="", export_kohya=False, export_comfy=False,
                  scheduler="constant", warmup_steps=0, scheduler_cycles=1, scheduler_power=1.0, weight_decay=0.0,
                  betas="", eps=0.0, optimizer_args="", max_grad_norm=1.0, batch_size=1, gradient_accumulation=1,
                  loss_type="l2", huber_c=0.1, caption_dropout=0.0, ema_decay=0.0, shuffle_tags=False, keep_tags=1,
                  text_encoders="none", text_encoder_rank=8, text_encoder_alpha=8.0, text_encoder_lr=0.0)
    values.update(changes)
    return values


def test_schema_defaults_build_the_default_recipe(options):
    schema = options.FluxLoraOptions.INPUT_TYPES()["required"]
    defaults = {name: (spec[1]["default"]) for name, spec in schema.items()}
    assert set(defaults) == set(widgets())
    assert all("tooltip" in spec[1] for spec in schema.values())
    (built,) = options.FluxLoraOptions().build(**defaults)
    config = importlib.import_module(f"{PACK}.trainer_core.config")
    lora_cfg, train_cfg = options.apply_options(config.LoraConfig(), config.TrainConfig(), built)
    assert lora_cfg == config.LoraConfig() and train_cfg == config.TrainConfig()


def test_options_reach_the_optimizer_schedule_and_adapter(options, sample_cache):
    """Run through the pack's own trainer_core copy, as ComfyUI would."""
    config = importlib.import_module(f"{PACK}.trainer_core.config")
    train = importlib.import_module(f"{PACK}.trainer_core.train")
    tiny = importlib.import_module(f"{PACK}.trainer_core.models.tiny")
    (built,) = options.FluxLoraOptions().build(**widgets(betas="0.8, 0.95", scheduler="linear", algorithm="loha",
                                                         targets="mmdit", weight_decay=0.01))
    lora_cfg, train_cfg = options.apply_options(config.LoraConfig(rank=4, alpha=4),
                                                config.TrainConfig(steps=4, compute_dtype="fp32"), built)
    session = train.TrainingSession(tiny.build_tiny_transformer(seed=0), sample_cache, lora_cfg, train_cfg,
                                    device="cpu")
    try:
        group = session.optimizer.param_groups[0]
        assert tuple(group["betas"]) == (0.8, 0.95) and group["weight_decay"] == 0.01
        lr_before = session.lr
        session.step()
        assert session.lr < lr_before  # linear decay, not the constant default
        names = [n for n, _ in session.transformer.named_parameters() if n.endswith("hada_w1_a.default")]
        assert names and all(n.startswith("transformer_blocks.") for n in names)  # LoHa, on mmdit targets only
    finally:
        session.close()


@pytest.mark.parametrize("change,message", [
    (dict(betas="0.9"), "betas"),
    (dict(targets="regex"), "targets_regex"),
    (dict(use_dora=True, algorithm="lokr"), "use_dora"),
    (dict(caption_dropout=1.5), "caption_dropout"),
])
def test_bad_options_are_refused_by_name(options, change, message):
    errors = importlib.import_module(f"{PACK}.trainer_core.errors")
    with pytest.raises(errors.TrainerInputError, match=message):
        options.FluxLoraOptions().build(**widgets(**change))
