"""The command line: the demo runs end to end; train reads TOML and reports bad settings clearly."""

import json

import pytest

from trainer_core.cli import main
from trainer_core.config import RunConfig, load_run_config
from trainer_core.errors import TrainerInputError


def test_demo_trains_and_writes_every_artifact(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "20", "--resolution", "64"]) == 0
    for name in ("demo_lora.safetensors", "loss.png", "samples.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    printed = capsys.readouterr().out
    assert "first" in printed and "last" in printed


def test_train_config_round_trip_and_unknown_keys(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[train]\nsteps = 5\nlearning_rate = 2e-4\n[dataset]\nresolutions = 512\n[lora]\nrank = 8\n')
    run = load_run_config(good)
    assert (run.train.steps, run.train.learning_rate, run.dataset.resolutions, run.lora.rank) == (5, 2e-4, [512], 8)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstep = 5\n")
    with pytest.raises(TrainerInputError, match="unknown setting 'step'"):
        load_run_config(bad)
    bad.write_text("[trian]\nsteps = 5\n")
    with pytest.raises(TrainerInputError, match=r"unknown section \[trian\]"):
        load_run_config(bad)
    bad.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(TrainerInputError, match="'steps' must be a number"):
        load_run_config(bad)


@pytest.mark.parametrize("resolution", [500, 0])
def test_resolution_not_multiple_of_16_is_refused(resolution):
    run = RunConfig()
    run.dataset.resolutions = [resolution]
    with pytest.raises(TrainerInputError, match="dataset.resolutions.*multiple of 16"):
        run.validate()


def test_train_command_names_missing_model_file(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\ntransformer = "{tmp_path / "nope.safetensors"}"\nvae = "v"\nclip_l = "c"\nt5 = "t"\n'
                   f'[dataset]\nfolder = "{tmp_path}"\n')
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "transformer" in err and "nope.safetensors" in err
