"""What a run leaves behind and prints: one metrics row per step across resumes, no temporary files from killed
saves, one announcement per checkpoint, no library notices that are not the user's business."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_core import checkpoint as ckpt
from trainer_core.config import LoraConfig, TrainConfig
from trainer_core.models.tiny import build_tiny_transformer
from trainer_core.train import train_lora

REPO = Path(__file__).resolve().parents[1]


def _train(cache, out, steps, **kwargs):
    cfg = TrainConfig(steps=steps, learning_rate=1e-3, compute_dtype="fp32", checkpoint_every=3, keep_checkpoints=5,
                      timestep_sampling="sigmoid", seed=7)
    return train_lora(build_tiny_transformer(seed=0), cache, lora_cfg=LoraConfig(rank=4, alpha=4), train_cfg=cfg,
                      output_dir=out, output_name="t", device="cpu", **kwargs)


def test_resumed_run_logs_every_step_exactly_once(sample_cache, tmp_path, stop_at):
    with pytest.raises(KeyboardInterrupt):
        _train(sample_cache, tmp_path, 8, callbacks=stop_at(5))
    # As kill -9 after step 5 leaves it: metrics through step 5, the last checkpoint at step 3.
    run_dir = tmp_path / "checkpoints" / "t"
    (run_dir / "step_000005.safetensors").unlink()
    assert ckpt.latest_checkpoint(run_dir).name == "step_000003.safetensors"
    result = _train(sample_cache, tmp_path, 8, resume=True)
    assert result.resumed_from == 3
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))  # the raw file, not a reader that skips repeats
    assert [row["loss"] for row in rows] == result.losses


def test_temporary_files_of_killed_saves_are_removed_by_the_next_run(sample_cache, tmp_path):
    _train(sample_cache, tmp_path, 3)
    run_dir = tmp_path / "checkpoints" / "t"
    # What kill -9 in the middle of a checkpoint and of a LoRA save leaves (atomic_path's temporary names) …
    stale = [run_dir / ".step_000006.safetensors.0a1b2c3d.tmp", tmp_path / ".t.safetensors.9f8e7d6c.tmp",
             tmp_path / ".t_ema_kohya.safetensors.00aa11bb.tmp"]
    # … and files that are not ours to delete: another run's save in flight, the user's own files.
    foreign = [tmp_path / ".t_001.safetensors.0a1b2c3d.tmp", tmp_path / ".other.safetensors.0a1b2c3d.tmp",
               tmp_path / "notes.tmp", tmp_path / ".t.safetensors.tmp", run_dir / "my_notes.txt"]
    for path in stale + foreign:
        path.write_bytes(b"partial")
    _train(sample_cache, tmp_path, 6, resume=True)
    assert [p.name for p in stale if p.exists()] == []
    assert [p.name for p in foreign if not p.exists()] == []


def test_each_checkpoint_is_announced_once(tmp_path):
    """As a user sees it: the command's own process, its console logging and progress bars."""
    done = subprocess.run([sys.executable, "-m", "trainer_core", "demo", "--out", str(tmp_path), "--steps", "4",
                           "--resolution", "64"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    checkpoint = tmp_path / "checkpoints" / "demo_lora" / "step_000004.safetensors"
    assert checkpoint.is_file()
    printed = done.stdout + done.stderr
    assert printed.count(checkpoint.name) == 1, printed
    assert "kernels" not in printed  # nor the bitsandbytes notice (shown only on CPUs where bitsandbytes tries it)


def test_bitsandbytes_optional_kernel_notice_is_not_shown(caplog):
    import trainer_core  # noqa: F401  (the filter is installed when the package is imported)

    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        # the notice bitsandbytes logs at import on CPUs with AVX-512 bf16 when the optional `kernels` is missing
        bnb_cpu.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                        "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        bnb_cpu.warning("some other bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes problem"]
