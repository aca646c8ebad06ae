"""Data-parallel training on several processes started by a launcher (torchrun, ``accelerate launch``).

A launcher puts ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in each process's environment; :func:`setup` joins
their process group only when ``WORLD_SIZE`` > 1, whatever the number of visible GPUs. Anything else — the CLI run
directly, and always ComfyUI, which never calls :func:`setup` — is one process, and every helper here is then a
no-op that returns its input. A process group made by someone else in the same process is never used.

Each process holds the whole frozen base and the same LoRA and trains on its share of every batch
(``BatchOrder.shard``); :func:`average_gradients` makes the adapter gradients the mean over all processes before
each optimizer step, so every process takes the same step. Process 0 (:func:`is_main`) writes every file.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import TrainerInputError

log = logging.getLogger(__name__)

T = TypeVar("T")

_group: "dist.ProcessGroup | None" = None  # ours, set by setup(); None on a single process
_backend = ""


def launched() -> bool:
    """True when a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | str) -> torch.device:
    """Join the launcher's process group if there is one; return the device this process trains on.

    On CUDA each process takes GPU ``LOCAL_RANK`` and the backend is NCCL (gloo on Windows, which has no NCCL);
    on the CPU it is gloo. On a single process this returns ``device`` unchanged and does nothing else.
    """
    global _group, _backend
    device = torch.device(device)
    if not launched() or _group is not None:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise TrainerInputError(
                f"LOCAL_RANK is {local_rank} but this machine has {count} visible GPU(s): start at most {count} "
                f"processes per machine (torchrun --nproc-per-node {count}), or list more GPUs in "
                f"CUDA_VISIBLE_DEVICES."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    _backend = "nccl" if device.type == "cuda" and sys.platform != "win32" and dist.is_nccl_available() else "gloo"
    dist.init_process_group(_backend, device_id=device if _backend == "nccl" else None)
    _group = dist.group.WORLD
    log.info("process %d of %d (local %d) on %s, backend %s", rank(), world_size(), local_rank, device, _backend)
    return device


def teardown() -> None:
    """Leave the process group that :func:`setup` joined (nothing on a single process)."""
    global _group
    if _group is not None:
        dist.destroy_process_group()
        _group = None


def world_size() -> int:
    return dist.get_world_size(_group) if _group is not None else 1


def rank() -> int:
    return dist.get_rank(_group) if _group is not None else 0


def is_main() -> bool:
    """Process 0: the one that writes files, logs metrics, samples and shows progress."""
    return rank() == 0


def barrier() -> None:
    if _group is not None:
        dist.barrier(group=_group)


def _comm_device(tensor: torch.Tensor) -> torch.device:
    # NCCL reduces on the GPU; gloo is used here for CPU tensors (on Windows the GPU's are copied over).
    return tensor.device if _backend == "nccl" else torch.device("cpu")


def on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run by process 0 only; every process returns its result, or raises its error.

    For steps that write files (the cache, the run's output folder): the others wait here, so none reads a file
    before it is complete. Results and errors travel pickled between this run's own processes.
    """
    if _group is None:
        return fn(*args, **kwargs)
    outcome: list[Any] = [None]
    if is_main():
        try:
            outcome[0] = (fn(*args, **kwargs), None)
        except Exception as exc:  # every process raises it, so the launcher sees one clean failure
            outcome[0] = (None, exc)
    dist.broadcast_object_list(outcome, src=0, group=_group)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def check_same(value: Any, what: str) -> None:
    """Refuse to train when processes disagree on ``value`` (e.g. different config files on two machines, or
    memory preset ``auto`` picking different batch sizes on GPUs of different sizes)."""
    if _group is None:
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value, group=_group)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise TrainerInputError(
            f"{what} differ between processes: process 0 has {values[0]!r}, process {differ[0]} has "
            f"{values[differ[0]]!r}. Give every process the same config file and settings (set [memory] preset "
            f"explicitly rather than 'auto' when the GPUs differ)."
        )


def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Copy process 0's values into every process's ``params``, so all start from the same LoRA."""
    if _group is None or not params:
        return
    with torch.no_grad():
        for param in params:
            buffer = param.data.to(_comm_device(param.data))
            dist.broadcast(buffer, src=0, group=_group)
            param.data.copy_(buffer)


def average_gradients(params: Sequence[torch.nn.Parameter], *scalars: float) -> list[float]:
    """Make every parameter's gradient, and each of ``scalars`` (e.g. the loss), the mean over all processes.

    Why an explicit all-reduce rather than torch's DistributedDataParallel: only the adapter (LoRA and text-encoder
    LoRA) parameters train, and they are small (tens of MB for FLUX at rank 16), so one flat all-reduce per
    optimizer step, after gradient accumulation, costs little. DDP would wrap the transformer alone (not the text
    encoders), broadcast the whole module state at start (the 12 B-parameter frozen base included, some of it
    fp8/nf4 storage), expect the module's parameters on one device (block swap keeps frozen blocks in host RAM),
    and need ``no_sync`` for accumulation and ``static_graph`` for the re-entrant checkpointing with activation
    offload hooks. Reducing the adapter gradients directly leaves every per-process memory feature as it is.

    A parameter without a gradient on some process counts as zero there and keeps None only when it has none on
    every process, as on one process with the whole batch. Returns the averaged scalars.
    """
    if _group is None:
        return list(scalars)
    params = list(params)
    device = _comm_device(params[0].data) if params else torch.device("cpu")
    head = torch.tensor([*scalars, *(float(p.grad is not None) for p in params)], dtype=torch.float32, device=device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, torch.float32)
             for p in params]
    flat = torch.cat([head, *grads])
    dist.all_reduce(flat, group=_group)
    flat /= world_size()
    means, had_grad = flat[:len(scalars)].tolist(), flat[len(scalars):len(head)].tolist()
    offset = len(head)
    for param, anywhere in zip(params, had_grad):
        n = param.numel()
        if anywhere > 0:
            param.grad = flat[offset:offset + n].view_as(param).to(param.device, param.dtype)
        offset += n
    return means


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any of them (a stop request agreed by all)."""
    if _group is None:
        return flag
    tensor = torch.tensor([float(flag)], device="cuda" if _backend == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_group)
    return bool(tensor.item())


_stop_signal: str | None = None


def stop_signalled() -> bool:
    """True once a stop signal arrived inside :func:`stop_signals`."""
    return _stop_signal is not None


def _defer_stop(signum, _frame) -> None:
    global _stop_signal
    name = signal.Signals(signum).name
    if _stop_signal is not None and _group is None:
        raise KeyboardInterrupt  # a second Ctrl+C on one process: stop at once (the step rolls back)
    if _stop_signal is None:
        log.warning("%s received: stopping with a checkpoint after the current step%s", name,
                    " (press Ctrl+C again to stop at once)" if _group is None else ", once every process agrees")
    _stop_signal = name


@contextmanager
def stop_signals() -> Iterator[None]:
    """While training, a stop signal lets the step in flight finish and only sets :func:`stop_signalled`; the loop
    stops between steps, so the checkpoint it saves resumes exactly.

    One process: Ctrl+C (SIGINT), and a second Ctrl+C stops at once — only where Python's own handler is
    installed (the CLI); ComfyUI runs nodes in a worker thread, where nothing changes. N processes: SIGINT and
    SIGTERM, which torchrun and ``accelerate launch`` pass on to every process and follow with a kill 30 s later;
    the loop agrees on the stop with :func:`any_process`, every process stops at the same step, and process 0
    writes a checkpoint matching all (a process ended mid-step would leave the others waiting in a collective).
    """
    global _stop_signal
    _stop_signal = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _group is not None:
        signals = (signal.SIGINT, signal.SIGTERM)
    elif signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signals = (signal.SIGINT,)
    else:
        signals = ()
    previous = {sig: signal.signal(sig, _defer_stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
