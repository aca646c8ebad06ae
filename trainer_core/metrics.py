"""Per-step metrics as JSON lines, and the loss curve drawn with PIL alone (no plotting library to install)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_path

log = logging.getLogger(__name__)

_BACKGROUND = (255, 255, 255)
_AXES = (60, 60, 60)
_GRID = (228, 228, 228)
_RAW = (160, 190, 230)
_SMOOTH = (20, 80, 180)
_TEXT = (30, 30, 30)


class MetricsLog:
    """Appends one JSON object per line, e.g. ``{"step": 12, "loss": 0.31, "lr": 1e-4}``.

    Each line is written and the file closed at once, so a crash loses at most the line being written.
    A resumed run first calls :meth:`resume_at`, so the file never holds a step twice.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, default=float)  # default=float: tensor / numpy scalars
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def resume_at(self, step: int) -> None:
        """Keep only the rows up to ``step`` (the checkpoint a run resumes from), so the resumed steps append
        after it instead of repeating the steps a killed run logged past its last checkpoint."""
        if not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path) if _step(row) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(row, default=float) + "\n" for row in kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics file in step order ([] if it does not exist yet).

    A step that goes backwards marks a restart (resume from a checkpoint, or a fresh run into the same
    file): earlier rows at or after that step are dropped. A torn last line (crash mid-write) is skipped.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not valid JSON (interrupted write?); skipped", path, number)
            continue
        if not isinstance(row, dict):
            continue
        while rows and _step(row) > -math.inf and _step(rows[-1]) >= _step(row):
            rows.pop()
        rows.append(row)
    return rows


def smooth(losses: Sequence[float]) -> list[float]:
    """Centred moving average over about a tenth of the run (no lag, unlike an EMA); non-finite values are
    left out of each window."""
    half = len(losses) // 20
    sums, counts = [0.0], [0]
    for value in losses:
        ok = math.isfinite(value)
        sums.append(sums[-1] + (value if ok else 0.0))
        counts.append(counts[-1] + ok)
    out = []
    for i in range(len(losses)):
        lo, hi = max(0, i - half), min(len(losses), i + half + 1)
        n = counts[hi] - counts[lo]
        out.append((sums[hi] - sums[lo]) / n if n else math.nan)
    return out


def loss_curve_image(losses: Sequence[float], size: tuple[int, int] = (512, 320)) -> Image.Image:
    """The loss per step (light) and its smoothed trend (dark), with axes, min/max and the step count."""
    width, height = size
    img = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(max(9, min(width, height) // 22))
    line_h = _text_size(draw, "0", font)[1]
    values = [float(v) for v in losses]
    finite = [v for v in values if math.isfinite(v)]
    hi, lo = (max(finite), min(finite)) if finite else (1.0, 0.0)
    span = hi - lo or max(abs(hi), 1.0) * 0.1  # a flat curve sits mid-height
    base = lo if hi > lo else lo - span / 2
    labels = [f"{base + span:.4g}", f"{base:.4g}"]  # the y-axis ends
    left = 10 + max(_text_size(draw, t, font)[0] for t in labels)
    top, right, bottom = 2 * line_h + 8, 12, line_h + 12
    box = (left, top, max(left + 1, width - right), max(top + 1, height - bottom))

    for k in range(5):  # horizontal grid
        y = box[1] + (box[3] - box[1]) * k / 4
        draw.line([(box[0], y), (box[2], y)], fill=_GRID)
    draw.line([(box[0], box[1]), (box[0], box[3]), (box[2], box[3])], fill=_AXES, width=1)

    if not finite:
        message = "no loss values yet"
        tw, th = _text_size(draw, message, font)
        draw.text(((box[0] + box[2] - tw) / 2, (box[1] + box[3] - th) / 2), message, fill=_TEXT, font=font)
        draw.text((4, 4), "loss", fill=_TEXT, font=font)
        return img

    count = len(values)

    def point(i: int, v: float) -> tuple[float, float]:
        x = box[0] + (box[2] - box[0]) * (i / (count - 1) if count > 1 else 0.5)
        return x, box[3] - (box[3] - box[1]) * (v - base) / span

    smoothed = smooth(values)
    for series, colour, line_width in ((values, _RAW, 1), (smoothed, _SMOOTH, 2)):
        run: list[tuple[float, float]] = []
        for i, v in enumerate(series + [math.nan]):  # a NaN ends the current stretch of line
            if math.isfinite(v):
                run.append(point(i, v))
                continue
            if len(run) > 1:
                draw.line(run, fill=colour, width=line_width, joint="curve")
            elif run:
                x, y = run[0]
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            run = []

    # Positions from measured text sizes (anchors need FreeType, which the fallback font lacks).
    draw.text((box[0] - 6 - _text_size(draw, labels[0], font)[0], box[1]), labels[0], fill=_TEXT, font=font)
    draw.text((box[0] - 6 - _text_size(draw, labels[1], font)[0], box[3] - line_h - 2), labels[1], fill=_TEXT,
              font=font)
    draw.text((box[0], box[3] + 4), "1", fill=_TEXT, font=font)
    draw.text((box[2] - _text_size(draw, str(count), font)[0], box[3] + 4), str(count), fill=_TEXT, font=font)
    draw.text(((box[0] + box[2] - _text_size(draw, "step", font)[0]) / 2, box[3] + 4), "step", fill=_TEXT, font=font)
    best = values.index(lo) + 1
    last = next(v for v in reversed(smoothed) if math.isfinite(v))
    steps = f"{count} step{'s' if count > 1 else ''}"
    titles = [
        f"loss · {steps} · min {lo:.4g} (step {best}) · max {hi:.4g} · smoothed {last:.4g}",
        f"loss · {steps} · min {lo:.4g} · max {hi:.4g}",
        f"{steps} · min {lo:.4g}",
    ]
    title = next((t for t in titles if _text_size(draw, t, font)[0] <= width - 8), titles[-1])
    draw.text((4, 4), title, fill=_TEXT, font=font)
    return img


def plot_loss(losses: Sequence[float], path: Path, size: tuple[int, int] = (800, 450)) -> Path:
    """Write the loss curve as a PNG (atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        loss_curve_image(losses, size).save(tmp, format="PNG")
    return path


def _step(row: dict[str, Any]) -> float:
    step = row.get("step")
    return float(step) if isinstance(step, (int, float)) else -math.inf


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0
