"""`python -m trainer_core tiny-models DIR`: model files and a ready config that `train --config` runs as is."""

import torch

from trainer_core.cli import main
from trainer_core.config import load_run_config
from trainer_core.lora import read_lora_file
from trainer_core.models.flux import load_flux_transformer


def test_train_config_runs_on_the_written_tiny_models(tmp_path, capsys):
    folder = tmp_path / "tiny"
    assert main(["tiny-models", str(folder)]) == 0
    config = folder / "train.toml"
    assert f"--config {config}" in capsys.readouterr().out  # it says what to run next
    assert load_run_config(config).model.transformer == (folder / "flux1-tiny.safetensors").as_posix()

    # the README's headless command, on the written config (fewer steps: a test, not the minute-long run)
    assert main(["train", "--config", str(config), "--steps", "3", "--device", "cpu"]) == 0
    out = folder / "output"
    _, meta = read_lora_file(out / "tiny_lora.safetensors")
    assert meta["base_model"] == "flux1-tiny.safetensors" and meta["steps"] == "3"
    assert (out / "samples.png").is_file() and (out / "loss.png").is_file()

    # the diffusers-format folder holds the same transformer as the BFL file
    bfl = load_flux_transformer(folder / "flux1-tiny.safetensors", dtype=torch.float32).state_dict()
    diffusers = load_flux_transformer(folder / "flux1-tiny-diffusers", dtype=torch.float32).state_dict()
    assert bfl.keys() == diffusers.keys() and all(torch.equal(bfl[k], diffusers[k]) for k in bfl)


def test_an_existing_folder_is_never_overwritten(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    assert main(["tiny-models", str(folder)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
