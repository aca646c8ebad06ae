"""The command line: the demo runs end to end; train reads TOML and reports bad settings clearly."""

import json
import logging

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


def test_train_command_trains_from_model_files_on_disk(tmp_path, capsys, tiny_model_files, caplog):
    """The headless path end to end: BFL transformer file, diffusers VAE folder, encoder folders + tokenizers; the
    memory plan printed before loading gives the host RAM beside the memory estimate."""
    caplog.set_level(logging.INFO)
    cfg = tmp_path / "run.toml"
    cfg.write_text(tiny_model_files.model_section() + f"""[dataset]
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
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan ("))
    assert "FLUX.1" in plan and "memory estimate at 64×64" in plan and "host RAM estimate" in plan


# --- everything is validated before the first expensive step -----------------------------------------------------

@pytest.mark.parametrize("section,line,message", [
    ("train", "learning_rate = nan", r"'learning_rate' must be a finite number, got nan"),
    ("train", "learning_rate = inf", r"'learning_rate' must be a finite number, got inf"),
    ("lora", "alpha = -inf", r"'alpha' must be a finite number"),
    ("dataset", 'resolutions = ["64"]', r"\[dataset\]: 'resolutions' entries must be a number, got '64'"),
    ("dataset", "folder = 123", r"\[dataset\]: 'folder' must be text \(in quotes\), got 123"),
    ("output", "folder = 123", r"\[output\]: 'folder' must be text"),
    ("sample", "prompts = [1, 2]", r"\[sample\]: 'prompts' entries must be text \(in quotes\), got 1"),
    ("output", f'name = "{"x" * 240}"', r"output.name: the name is 240 bytes long; use at most 150"),
    ("output", f'name = "{"x" * 300}"', r"output.name: the name is 300 bytes long"),
])
def test_bad_config_values_are_refused_in_one_line(tmp_path, capsys, section, line, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"[{section}]\n{line}\n", encoding="utf-8")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_non_finite_values_are_refused_by_the_configs_themselves():
    from trainer_core.config import LoraConfig, SampleConfig, TrainConfig

    for bad in (TrainConfig(learning_rate=float("nan")), TrainConfig(betas=[0.9, float("nan")]),
                LoraConfig(alpha=float("nan")), SampleConfig(guidance=float("inf"))):
        with pytest.raises(TrainerInputError, match="must be a finite number"):
            bad.validate()


@pytest.mark.parametrize("device,message", [("foo", "is not a device name"), ("cuda:7", "cuda"), ("xla", "xla")])
def test_unknown_or_absent_device_is_refused(capsys, device, message):
    assert main(["train", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device:") and message in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_model_files):
    models = tiny_model_files.folder
    cache = tmp_path_factory.mktemp("cache")

    def write(path, out, transformer=None, steps=6, checkpoint_every=0):
        path.write_text(tiny_model_files.model_section(transformer) + f"""[dataset]
folder = "{SAMPLES_DIR.as_posix()}"
resolutions = [64]
allow_upscale = true
[train]
steps = {steps}
compute_dtype = "fp32"
checkpoint_every = {checkpoint_every}
[sample]
width = 64
height = 64
steps = 2
[output]
folder = "{out.as_posix()}"
name = "mine"
cache_folder = "{cache.as_posix()}"
""", encoding="utf-8")
        return path

    write.models = models
    return write


def test_a_vae_given_as_the_transformer_is_refused_before_caching(tmp_path, capsys, tiny_files):
    cfg = tiny_files(tmp_path / "run.toml", tmp_path / "out", transformer=tiny_files.models / "vae_weights.safetensors")
    assert main(["train", "--config", str(cfg), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "vae_weights.safetensors is neither a FLUX.1 nor a FLUX.2 transformer" in err
    assert not (tmp_path / "out").exists()  # nothing was cached or written


def test_ctrl_c_while_caching_claims_no_checkpoint(tmp_path, capsys, tiny_files, monkeypatch):
    from trainer_core.data import cache

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "build_cache", interrupted)
    cfg = tiny_files(tmp_path / "run.toml", tmp_path / "out")
    assert main(["train", "--config", str(cfg), "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert "there is no checkpoint to resume" in err and "resumable" not in err


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_files):
    """A real SIGINT to a real ``python -m trainer_core train`` mid-run, then ``--resume``: the LoRA is bit for
    bit the one an uninterrupted run writes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    root = SAMPLES_DIR.parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    steps = 150

    def command(name, *extra):
        cfg = tiny_files(tmp_path / f"{name}.toml", tmp_path / name, steps=steps)
        return [sys.executable, "-m", "trainer_core", "train", "--config", str(cfg), "--device", "cpu", *extra]

    def run(args):
        return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)

    full = run(command("full"))
    assert full.returncode == 0, full.stderr[-2000:]

    metrics = tmp_path / "split" / "checkpoints" / "mine" / "metrics.jsonl"
    process = subprocess.Popen(command("split"), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline and process.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted: resumable checkpoint kept at" in stderr
    from trainer_core import checkpoint as ckpt

    stopped_at = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints" / "mine")).step
    assert 10 <= stopped_at < steps  # really interrupted mid-run
    assert not (tmp_path / "split" / "mine.safetensors").exists()

    resumed = run(command("split", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "full" / "mine.safetensors"), load_file(tmp_path / "split" / "mine.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_while_drawing_the_comparison_samples_keeps_the_finished_lora(tmp_path, monkeypatch, capsys,
                                                                           tiny_files):
    """The LoRA is written before the before/after samples; a Ctrl+C there says so instead of 'before training'."""
    import trainer_core.train

    real, calls = trainer_core.train.sample_validation, []

    def interrupted_after_training(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the first call is the trainer's own final validation sample
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_core.train, "sample_validation", interrupted_after_training)
    cfg = tiny_files(tmp_path / "run.toml", tmp_path / "out", steps=2)
    assert main(["train", "--config", str(cfg), "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert "the LoRA above is complete" in err and "before training" not in err
    assert (tmp_path / "out" / "mine.safetensors").is_file()
