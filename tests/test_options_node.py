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
                  rank_pattern="", alpha_pattern="", init_from="none", export_kohya=False, export_comfy=False,
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


@pytest.fixture
def comfy_loras(tmp_path, monkeypatch):
    """A stand-in for ComfyUI's folder_paths: models/loras and output/loras listed under "loras"."""
    import os
    import sys
    import types

    loras = [tmp_path / "models" / "loras", tmp_path / "output" / "loras"]
    for folder in (*loras, tmp_path / "input"):
        folder.mkdir(parents=True)
    (loras[0] / "style.safetensors").write_bytes(b"x")
    (loras[1] / "mine.safetensors").write_bytes(b"x")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    (loras[0] / "leak.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")

    def get_full_path(kind, name):  # ComfyUI's lookup: the name is made relative, then found in a search path
        relative = os.path.relpath(os.path.join("/", name), "/")
        return next((os.path.join(root, relative) for root in loras if os.path.isfile(os.path.join(root, relative))),
                    None) if kind == "loras" else None

    module = types.ModuleType("folder_paths")
    module.models_dir = str(tmp_path / "models")
    module.folder_names_and_paths = {"loras": ([str(p) for p in loras], {".safetensors"})}
    module.get_input_directory = lambda: str(tmp_path / "input")
    module.get_output_directory = lambda: str(tmp_path / "output")
    module.get_full_path = get_full_path
    module.get_filename_list = lambda kind: sorted(p.name for root in loras for p in root.iterdir())
    monkeypatch.setitem(sys.modules, "folder_paths", module)
    return loras


def test_init_from_is_picked_from_comfyuis_lora_list_never_a_free_path(options, comfy_loras, tmp_path, monkeypatch):
    """Through the HTTP API any string arrives: only a LoRA ComfyUI lists (models/loras, output/loras) is read,
    with symlinks resolved inside ComfyUI's folders — never /etc/shadow or a file a link leads to."""
    errors = importlib.import_module(f"{PACK}.trainer_core.errors")
    bridge = importlib.import_module(f"{PACK}.nodes.comfy_bridge")
    monkeypatch.delenv(bridge.ALLOW_PATHS_ENV, raising=False)
    kind, spec = options.FluxLoraOptions.INPUT_TYPES()["required"]["init_from"]
    assert kind == ["none", "leak.safetensors", "mine.safetensors", "style.safetensors"] and spec["default"] == "none"
    build = options.FluxLoraOptions().build
    assert build(**widgets())[0]["lora"]["init_from"] == ""
    assert build(**widgets(init_from="style.safetensors"))[0]["lora"]["init_from"] == \
        str((comfy_loras[0] / "style.safetensors").resolve())
    assert build(**widgets(init_from="mine.safetensors"))[0]["lora"]["init_from"] == \
        str((comfy_loras[1] / "mine.safetensors").resolve())
    for escape in ("/etc/shadow", "../../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        with pytest.raises(errors.TrainerInputError, match=r"init_from: .* is not in ComfyUI's LoRA list"):
            build(**widgets(init_from=escape))
    with pytest.raises(errors.TrainerInputError, match=r"init_from: .*leak\.safetensors' leads outside"):
        build(**widgets(init_from="leak.safetensors"))
    monkeypatch.setenv(bridge.ALLOW_PATHS_ENV, "1")
    assert build(**widgets(init_from="leak.safetensors"))[0]["lora"]["init_from"] == \
        str((tmp_path / "elsewhere.safetensors").resolve())
