"""Metrics log (JSON lines that survive crashes and resumes) and the PIL loss curve."""

import json
import math

import pytest
import torch
from PIL import Image

from trainer_core.metrics import MetricsLog, loss_curve_image, plot_loss, read_metrics, smooth

SMOOTH_BLUE = (20, 80, 180)


def test_rows_round_trip_one_json_object_per_line(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")  # parent folder created
    rows = [{"step": k, "loss": 1.0 / k, "lr": 1e-4, "seconds": 0.5} for k in range(1, 4)]
    for row in rows:
        log.append(row)
    log.append({"step": 4, "loss": torch.tensor(0.25)})  # tensor scalars are written as numbers
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0]) == rows[0]
    assert read_metrics(log.path) == rows + [{"step": 4, "loss": 0.25}]
    assert log.read() == read_metrics(log.path)


def test_each_line_is_on_disk_at_once_and_a_torn_line_is_skipped(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "loss": 0.5})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]  # visible without closing
    with open(log.path, "a") as f:
        f.write('{"step": 2, "lo')  # crash mid-write
    assert read_metrics(log.path) == [{"step": 1, "loss": 0.5}]


def test_resumed_steps_replace_the_rows_they_redo(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):  # crashed after step 5, last checkpoint at step 3
        log.append({"step": step, "loss": 1.0})
    for step in range(4, 7):  # the resumed run redoes 4 and 5
        log.append({"step": step, "loss": 2.0})
    rows = read_metrics(log.path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]


def test_missing_file_reads_as_no_rows(tmp_path):
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_smoothing_keeps_level_and_reduces_noise():
    assert smooth([0.3] * 50) == pytest.approx([0.3] * 50)
    noisy = [0.5 + (0.2 if k % 2 else -0.2) for k in range(200)]
    smoothed = smooth(noisy)
    assert len(smoothed) == 200 and max(abs(v - 0.5) for v in smoothed) < 0.02
    gap = smooth([1.0] * 20 + [math.nan] + [1.0] * 19)  # a non-finite loss is left out, not spread around
    assert gap == pytest.approx([1.0] * 40)


def colours(img):
    return {c for _, c in img.getcolors(maxcolors=1 << 20)}


def test_plot_loss_writes_a_png_of_the_requested_size(tmp_path):
    losses = [1.0 / (1 + k / 20) + 0.1 * math.sin(k) for k in range(300)]
    path = plot_loss(losses, tmp_path / "plots" / "loss.png", size=(640, 360))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 360)
        assert SMOOTH_BLUE in colours(img.convert("RGB"))  # the smoothed line is drawn
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["loss.png"]  # no temp file left


def test_smoothed_line_falls_with_the_loss():
    img = loss_curve_image([2.0 - k / 100 for k in range(100)], size=(400, 300))
    blue = [(x, y) for x in range(400) for y in range(300) if img.getpixel((x, y)) == SMOOTH_BLUE]
    left = [y for x, y in blue if x < 150]
    right = [y for x, y in blue if x > 300]
    assert left and right
    assert sum(left) / len(left) < sum(right) / len(right) - 100  # y grows downwards: high loss on the left


@pytest.mark.parametrize("losses", [[], [0.42], [0.5, math.nan, 0.4, math.inf, 0.3]])
def test_preview_handles_empty_single_and_non_finite(losses):
    img = loss_curve_image(losses, size=(256, 160))
    assert img.size == (256, 160) and img.mode == "RGB"
    assert len(colours(img)) > 2  # axes and text drawn, not a blank image
    if losses:
        assert SMOOTH_BLUE in colours(img)
