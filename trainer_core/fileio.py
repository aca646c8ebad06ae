"""Atomic, non-clobbering file writes shared by the cache, checkpoints and LoRA files."""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator

import torch
from safetensors.torch import save_file

from .errors import TrainerInputError

log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it: put it back at once

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{8}\.tmp$")  # what atomic_path names its temporary files


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On failure the temporary file is removed and ``path`` is untouched, so a crash never leaves a
    half-written file where a reader would find it (a killed process leaves the temporary file:
    :func:`remove_stale_temp_files`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        # Some writers (safetensors) create files readable by the owner only: give the usual umask permissions
        # so a LoRA written by a ComfyUI service is readable by the user's other tools.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` (which must not exist); on success it becomes ``path`` in one
    rename, so a reader never finds a half-written set of files. On failure the temporary folder is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_stale_temp_files(folder: Path, targets: Collection[str] | None = None) -> list[Path]:
    """Delete the temporary files that saves killed mid-write (kill -9, power loss) left in ``folder``.

    Only :func:`atomic_path`'s own names are touched, and with ``targets`` only those of the listed file names, so
    a folder shared with other runs keeps their saves in flight. Call it before the run writes anything there.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = _TEMP_NAME.match(path.name)
        if match and path.is_file() and (targets is None or match["target"] in targets):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted save in %s", len(removed), folder)
    return removed


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (contiguous CPU copies, metadata values as strings)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def unique_path(path: Path) -> Path:
    """``path`` if free, else ``stem_001.ext``, ``stem_002.ext``… — an earlier file is never clobbered."""
    path = Path(path)
    if not path.exists():
        return path
    for n in range(1, 100000):
        candidate = path.with_name(f"{path.stem}_{n:03d}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise TrainerInputError(f"Too many files named like {path} already exist; choose another output name.")


def ensure_writable_dir(path: Path, field: str) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise naming ``field``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainerInputError(
            f"{field}: cannot write to folder '{path}' ({exc.strerror or exc}). "
            f"Choose a folder you have write permission for, or fix its permissions."
        ) from exc
    return path


# Most file systems allow 255 bytes per name. A run's files add up to ~40 bytes to its name ("_NNN", "_ema",
# "_kohya", ".safetensors" and the ".<name>.<8 hex>.tmp" of an atomic write): names stay well below that.
MAX_NAME_BYTES = 150


def safe_output_name(name: str, field: str = "output_name") -> str:
    """Validate a user-given file stem so it cannot escape its output folder, and is short enough for every file
    the run derives from it."""
    stem = name.strip()
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    bad = set('<>:"/\\|?*') | {chr(c) for c in range(32)}
    if not stem or stem in {".", ".."} or any(ch in bad for ch in stem) or stem.startswith("."):
        raise TrainerInputError(
            f"{field}: '{name}' is not a valid file name. Use letters, digits, spaces, '-', '_' or '.', "
            f"without folder separators (the file always goes into the output folder)."
        )
    size = len(stem.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise TrainerInputError(
            f"{field}: the name is {size} bytes long; use at most {MAX_NAME_BYTES} (file systems allow 255 per "
            f"name, and the run adds suffixes such as '_001_ema_kohya.safetensors' to it)."
        )
    return stem
