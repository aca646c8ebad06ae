"""Start a headless ComfyUI for tests: only this pack enabled, on a free loopback port, over a scratch base folder.

    from comfy_server import start_comfyui
    with start_comfyui(base) as server:   # base: a folder; custom_nodes/ and the rest are created in it
        server.request("/object_info")

COMFYUI_DIR (a ComfyUI checkout) and COMFYUI_PYTHON (the Python it runs with, with this pack's requirements) come
from the environment unless passed. Import it the way fixtures.py is imported (tests/ is no package).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", "")
PACK_FOLDER = "flux_lora_trainer"  # the pack's folder name inside custom_nodes/
SKIP_REASON = "real-ComfyUI tests: set COMFYUI_DIR (a ComfyUI checkout) and COMFYUI_PYTHON (its Python) to run them"


def configured() -> bool:
    """Whether the environment names a ComfyUI to test against."""
    return bool(COMFYUI_DIR and COMFYUI_PYTHON)


@dataclass
class Server:
    url: str  # http://127.0.0.1:<port>
    base: Path  # ComfyUI's --base-directory: models/, input/, output/, custom_nodes/
    log: Path  # ComfyUI's stdout + stderr
    pid: int  # ComfyUI's process (bench/noderam.py samples its memory)

    def request(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            pytest.fail(f"{path}: HTTP {exc.code}: {exc.read().decode()[:2000]}")
        return json.loads(text) if text else None

    def queue(self, prompt: dict) -> str:
        return self.request("/prompt", {"prompt": prompt})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.request(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s; log tail:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def output_file(self, history: dict, node_id: str) -> Path:
        image = history["outputs"][node_id]["images"][0]
        return self.base / image["type"] / image["subfolder"] / image["filename"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def start_comfyui(base: Path, comfyui_dir: str | Path = "", python: str | Path = "",
                  ready_timeout: float = 300) -> Iterator[Server]:
    """Run ComfyUI's main.py --cpu on ``base`` with this pack linked in as custom_nodes/flux_lora_trainer; yield a
    Server once it answers HTTP; stop it on exit. ComfyUI's output goes to ``base/comfyui.log``."""
    comfyui_dir, python = str(comfyui_dir or COMFYUI_DIR), str(python or COMFYUI_PYTHON)
    if not (comfyui_dir and python):
        pytest.skip(SKIP_REASON)
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    port = _free_port()
    log = base / "comfyui.log"
    command = [
        python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
        "--log-stdout", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
        "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_FOLDER,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=comfyui_dir, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", base, log, process.pid)
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{server.log_tail()}")
            try:
                urllib.request.urlopen(server.url + "/system_stats", timeout=2).close()
                break
            except OSError:
                if time.monotonic() - started > ready_timeout:
                    pytest.fail(f"ComfyUI did not answer within {ready_timeout:.0f} s:\n{server.log_tail()}")
                time.sleep(0.5)
        print(f"ComfyUI ready after {time.monotonic() - started:.1f} s")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
