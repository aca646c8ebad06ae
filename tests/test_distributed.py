"""Data-parallel training on real launched processes (gloo on the CPU): ``python -m trainer_core train`` under
torchrun and ``accelerate launch``, as a user runs it, on the tiny model.

Two processes × batch 1 must train exactly what one process × batch 2 trains (the proof that the data is sharded
and the gradients averaged), only process 0 may write, and a run stopped by a signal to the launcher must resume
on two processes to the LoRA of the uninterrupted run — and refuse to resume on one.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_core import checkpoint as ckpt
from trainer_core.cli import SAMPLES_DIR, main
from trainer_core.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
STEPS = 6
LAUNCH_TIMEOUT = 300


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_files):
    """A run config over tiny model files on disk (BFL transformer, diffusers VAE, CLIP-L, T5, tokenizers)."""
    path = tmp_path_factory.mktemp("run") / "run.toml"
    path.write_text(tiny_model_files.model_section() + f"""[dataset]
folder = "{SAMPLES_DIR.as_posix()}"
resolutions = [64]
allow_upscale = true
[train]
steps = {STEPS}
learning_rate = 1e-3
compute_dtype = "fp32"
timestep_sampling = "sigmoid"
checkpoint_every = 3
seed = 3
[sample]
prompts = ["a robot"]
width = 64
height = 64
steps = 2
[output]
name = "dp"
""")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, config: Path, out: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    """Two processes of ``python -m trainer_core train`` started by ``launcher`` on this machine."""
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--main_process_port", str(free_port()), "--dynamo_backend", "no",
                   "--mixed_precision", "no"]
    command += [str(WORKER), "train", "--config", str(config), "--out", str(out), "--device", "cpu", *flags]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(command, env=environment, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def trained_lora(out: Path) -> dict[str, torch.Tensor]:
    """The run's final LoRA as it trained, in fp32 (the LoRA file holds it rounded to its save dtype)."""
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints" / "dp")).lora


@pytest.fixture(scope="module")
def two_process_run(config, tmp_path_factory):
    """The uninterrupted run: 2 processes × batch 1 under torchrun, every file write of each process recorded."""
    out = tmp_path_factory.mktemp("two")
    report = tmp_path_factory.mktemp("writes")
    done = launch("torchrun", config, out, "--batch-size", "1",
                  DISTRIBUTED_TEST_WATCH=str(out), DISTRIBUTED_TEST_REPORT=str(report))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out, report, done


def test_distributed_two_processes_train_what_one_process_with_the_global_batch_trains(two_process_run, config,
                                                                                      tmp_path):
    out, _, done = two_process_run
    assert "global batch 2 = 1 per process × 2 process(es) × 1 accumulation" in done.stderr
    assert main(["train", "--config", str(config), "--out", str(tmp_path), "--batch-size", "2",
                 "--device", "cpu"]) == 0

    two = [row["loss"] for row in read_metrics(out / "checkpoints" / "dp" / "metrics.jsonl")]
    one = [row["loss"] for row in read_metrics(tmp_path / "checkpoints" / "dp" / "metrics.jsonl")]
    assert len(two) == len(one) == STEPS
    assert two == pytest.approx(one, rel=1e-6, abs=0)
    a, b = trained_lora(out), trained_lora(tmp_path)
    assert a.keys() == b.keys() and (out / "dp.safetensors").is_file()
    flat_a, flat_b = (torch.cat([t[k].flatten() for k in sorted(t)]) for t in (a, b))
    error = ((flat_a - flat_b).norm() / flat_b.norm()).item()  # measured 5.7e-8
    worst_tensor = max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)  # measured 1.9e-6 (a lora_B)
    assert error <= 1e-6 and worst_tensor <= 1e-5, (error, worst_tensor)
    # the LoRA trained: every up-matrix left its zero init, by far more than the two runs differ
    assert all(b[k].abs().max() > 1e-4 for k in b if "lora_B" in k)


def test_distributed_only_process_0_writes_files(two_process_run):
    out, report, _ = two_process_run
    rank0, rank1 = (json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == []
    written = " ".join(rank0)
    assert all(name in written for name in ("dp.safetensors", "step_000003.safetensors", "metrics.jsonl",
                                            "samples.png", "latents"))  # the record sees process 0's writes


def test_distributed_stopped_run_resumes_on_the_same_processes_only(two_process_run, config, tmp_path, capsys):
    """SIGTERM to the launcher (here accelerate launch) mid-run: every process stops after the same step and
    process 0 leaves a checkpoint; resumed under torchrun it ends on the uninterrupted run's LoRA exactly. One
    process may not resume it."""
    uninterrupted, _, _ = two_process_run
    stopped = launch("accelerate", config, tmp_path, "--batch-size", "1", DISTRIBUTED_TEST_SIGNAL_AT="2")
    assert stopped.returncode != 0
    assert "Run again with resume on to continue" in stopped.stderr, stopped.stderr[-6000:]
    folder = tmp_path / "checkpoints" / "dp"
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step_000002.safetensors"]
    assert not (tmp_path / "dp.safetensors").exists()

    assert main(["train", "--config", str(config), "--out", str(tmp_path), "--batch-size", "1", "--device", "cpu",
                 "--resume"]) == 2
    assert "written by a run on 2 process(es) and this run has 1" in capsys.readouterr().err

    resumed = launch("torchrun", config, tmp_path, "--batch-size", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    for a, b in ((trained_lora(uninterrupted), trained_lora(tmp_path)),
                 (load_file(str(uninterrupted / "dp.safetensors")), load_file(str(tmp_path / "dp.safetensors")))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [row["loss"] for row in read_metrics(folder / "metrics.jsonl")]
    assert losses == [row["loss"] for row in read_metrics(uninterrupted / "checkpoints" / "dp" / "metrics.jsonl")]


def test_distributed_shards_split_each_global_batch_of_one_bucket_size():
    """3 processes × batch 2: the shards of every step are, in order, the batch of one process with batch 6 —
    one bucket size, topped up to full — so every process takes the same steps over the same epochs."""
    from trainer_core.data.dataset import BatchOrder

    sizes = [(64, 64)] * 7 + [(48, 80)] * 4
    one = BatchOrder(sizes, 6, repeats=2, seed=5)
    three = BatchOrder(sizes, 2, repeats=2, seed=5, processes=3)
    assert three.batches_per_epoch == one.batches_per_epoch == 5  # ceil(14 / 6) + ceil(8 / 6)
    for step in range(3 * one.batches_per_epoch):
        shards = [three.batch(step)[three.shard(r)] for r in range(3)]
        assert all(len(s) == 2 for s in shards)
        assert sum(shards, []) == one.batch(step)
        assert len({sizes[i] for i in one.batch(step)}) == 1
