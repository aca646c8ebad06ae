"""One process of a test launch (torchrun / accelerate launch): ``python -m trainer_core`` as a user runs it, plus
what the tests need to see from inside.

DISTRIBUTED_TEST_WATCH=<folder> and DISTRIBUTED_TEST_REPORT=<folder>: every file this process creates, writes,
renames or deletes under the watched folder is listed in ``<report>/rank<RANK>.json`` (Python's audit hooks see
the writes that go through Python, which every trainer write does: safetensors files land by ``os.replace``).
DISTRIBUTED_TEST_SIGNAL_AT=<step>: once process 0 finishes that step it sends SIGTERM to the launcher, as
``kill`` or a cluster scheduler would, and waits until the launcher has passed it back to this process, so the stop
lands mid-run at that step however loaded the machine is.
"""

import atexit
import json
import os
import signal
import sys
import time
from pathlib import Path

from trainer_core import cli, distributed

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def watch_writes(folder: Path, report: Path) -> None:
    folder = str(folder.resolve())
    writes: list[str] = []

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(folder)
        except TypeError:  # a file descriptor
            return False

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            if (any(c in mode for c in "wax+") or flags & WRITE_FLAGS) and under(args[0]):
                writes.append(f"open {args[0]}")
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.chmod") and under(args[0]):
            writes.append(f"{event} {args[0]}" + (f" -> {args[1]}" if event == "os.rename" else ""))

    def write_report():
        report.mkdir(parents=True, exist_ok=True)
        (report / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(writes))

    sys.addaudithook(hook)
    atexit.register(write_report)


def signal_launcher_at(step: int) -> None:
    on_step = cli.TqdmCallbacks.on_step

    def on_step_then_signal(self, info):
        on_step(self, info)
        if info.step == step:
            os.kill(os.getppid(), signal.SIGTERM)
            deadline = time.monotonic() + 60
            while not distributed.stop_signalled() and time.monotonic() < deadline:
                time.sleep(0.05)

    cli.TqdmCallbacks.on_step = on_step_then_signal  # only process 0 shows progress, so only it signals


if __name__ == "__main__":
    if os.environ.get("DISTRIBUTED_TEST_WATCH"):
        watch_writes(Path(os.environ["DISTRIBUTED_TEST_WATCH"]), Path(os.environ["DISTRIBUTED_TEST_REPORT"]))
    if os.environ.get("DISTRIBUTED_TEST_SIGNAL_AT"):
        signal_launcher_at(int(os.environ["DISTRIBUTED_TEST_SIGNAL_AT"]))
    sys.exit(cli.main(sys.argv[1:]))
