"""The command line: the demo runs end to end; train reads TOML and reports bad settings clearly."""

import json

import pytest

from trainer_core.cli import SAMPLES_DIR, main
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


def test_train_command_trains_from_model_files_on_disk(tmp_path, capsys):
    """The headless path end to end: BFL transformer file, diffusers VAE folder, encoder folders + tokenizers."""
    from safetensors.torch import save_file

    from trainer_core.models.flux import diffusers_to_bfl
    from trainer_core.models.tiny import TINY_T5_MAX_LENGTH, build_tiny_text_encoder, build_tiny_transformer, \
        build_tiny_vae

    models = tmp_path / "models"
    models.mkdir()
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in
               diffusers_to_bfl(build_tiny_transformer(seed=0).state_dict()).items()}, str(models / "flux.safetensors"))
    build_tiny_vae(seed=0).vae.save_pretrained(models / "vae")
    text = build_tiny_text_encoder(seed=0)
    text.clip_model.save_pretrained(models / "clip_l")
    text.t5_model.save_pretrained(models / "t5")
    text.clip_tokenizer.save_pretrained(models / "tokenizers" / "clip")
    text.t5_tokenizer.save_pretrained(models / "tokenizers" / "t5")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
[model]
transformer = "{(models / 'flux.safetensors').as_posix()}"
vae = "{(models / 'vae').as_posix()}"
clip_l = "{(models / 'clip_l').as_posix()}"
t5 = "{(models / 't5').as_posix()}"
tokenizers = "{(models / 'tokenizers').as_posix()}"
t5_max_length = {TINY_T5_MAX_LENGTH}
[dataset]
folder = "{SAMPLES_DIR.as_posix()}"
resolutions = [64]
allow_upscale = true
[train]
compute_dtype = "fp32"
checkpoint_every = 0
[sample]
width = 64
height = 64
steps = 4
[output]
folder = "{(tmp_path / 'out').as_posix()}"
""")
    assert main(["train", "--config", str(cfg), "--steps", "6", "--name", "mine", "--device", "cpu"]) == 0
    from trainer_core.lora import read_lora_file

    state, meta = read_lora_file(tmp_path / "out" / "mine.safetensors")
    assert meta["base_model"] == "flux.safetensors" and meta["steps"] == "6" and meta["resolutions"] == "64"
    assert (tmp_path / "out" / "samples.png").is_file()
