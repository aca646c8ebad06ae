"""Host RAM: the CLI streams the base to its final precision block by block, the host-RAM preflight refuses what
will not fit and names the knob, and the estimator's time floors say which bound a plan hits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer_core import memory
from trainer_core.config import MemoryConfig
from trainer_core.errors import TrainerInputError
from trainer_core.memory.estimate import GiB, estimate_host_ram, estimate_vram
from trainer_core.models.flux import diffusers_to_bfl, flux_config, load_flux_transformer
from trainer_core.models.tiny import build_tiny_transformer

REPO = Path(__file__).resolve().parents[1]


def _bfl_file(path: Path, config: dict, dtype=torch.bfloat16, seed: int = 0) -> Path:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    sd = {k: (torch.randn(t.shape) * 0.02).to(dtype) for k, t in model.state_dict().items()}
    save_file(diffusers_to_bfl(sd), str(path))
    return path


_MEASURE = textwrap.dedent("""
    import json, sys
    import psutil, torch
    from accelerate import init_empty_weights  # the libraries the loader uses, imported before measuring
    from diffusers import FluxTransformer2DModel
    from trainer_core.models.flux import load_flux_transformer
    before = psutil.Process().memory_info().rss
    model = load_flux_transformer(sys.argv[1], dtype=torch.bfloat16, base_precision=sys.argv[2])
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent process across exec
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    final = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(json.dumps({"before": before, "peak": peak, "final": final}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_streaming_load_to_fp8_never_holds_the_bf16_model(tmp_path):
    """A 340 MB bf16 file loaded to fp8 in a fresh process: the peak stays near the fp8 model plus one block,
    well under the file (mapped pages) plus the final model, let alone the whole bf16 model on the way."""
    config = dict(flux_config("flux1-dev"), num_layers=2, num_single_layers=6, num_attention_heads=8)  # width 1024
    path = _bfl_file(tmp_path / "flux.safetensors", config)
    file_bytes = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), "fp8"], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    double_block_bf16 = 2 * 18 * 1024 * 1024  # ≈ 37.7 M parameters in a double block of width 1024
    assert m["final"] < 0.6 * file_bytes  # the blocks really are fp8 now
    assert grew < m["final"] + 3 * double_block_bf16, (grew / 2**20, m["final"] / 2**20)
    assert grew < 0.6 * (file_bytes + m["final"])


@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_streamed_blocks_equal_the_converted_model(precision):
    """Streaming to fp8/nf4 while loading gives the same weights as loading in bf16 and converting afterwards."""
    sd = build_tiny_transformer(seed=0, num_attention_heads=4, num_layers=1, num_single_layers=2).to(
        torch.bfloat16).state_dict()
    streamed = load_flux_transformer(sd, dtype=torch.bfloat16, base_precision=precision)
    later = load_flux_transformer(sd, dtype=torch.bfloat16)
    memory.prepare_base(later, MemoryConfig(base_precision=precision), torch.bfloat16)
    if precision == "fp8":
        memory.precision.apply_storage_casts(later, "fp8", torch.bfloat16)
    memory.prepare_base(streamed, MemoryConfig(base_precision=precision), torch.bfloat16)
    a, b = streamed.state_dict(), later.state_dict()
    assert a.keys() == b.keys()
    linear = streamed.single_transformer_blocks[0].proj_out
    assert (linear.weight.dtype == torch.float8_e4m3fn) if precision == "fp8" else type(linear).__name__ == "Linear4bit"
    for key in a:
        assert torch.equal(a[key].view(torch.uint8) if a[key].dtype == torch.float8_e4m3fn else a[key],
                           b[key].view(torch.uint8) if b[key].dtype == torch.float8_e4m3fn else b[key]), key


def test_host_ram_preflight_refuses_and_names_the_knob():
    mem = memory.resolve_preset("8gb")
    vram = estimate_vram(None, mem)
    host = estimate_host_ram(vram, None, mem, text_encoder_bytes=10 * GiB)
    # the 8gb plan: fp8 base streamed (≈ 11.8 GiB while loading), 45 pinned blocks and offloaded inputs after
    assert 11 * GiB < host.total < 13 * GiB and host.pinned_blocks > 8 * GiB and host.pinned_activations > 0
    memory.check_host_ram(host, mem, available=16 * GiB)
    with pytest.raises(TrainerInputError, match=r'base_precision = "nf4".*offload_activations = false') as info:
        memory.check_host_ram(host, mem, available=12 * GiB)
    assert "host RAM" in str(info.value) and "12.0 GiB is available" in str(info.value)
    # ComfyUI's MODEL shared instead of copied: no second base, only what the plan makes beside it — the fp8
    # conversion of the blocks while it is applied, and the swapped blocks' pinned packs while training
    shared = estimate_host_ram(vram, None, mem, shared_base=True)
    assert shared.load_peak < host.load_peak and shared.base == shared.pinned_blocks == host.pinned_blocks
    bf16 = MemoryConfig(base_precision="bf16", gradient_checkpointing=True)
    assert estimate_host_ram(estimate_vram(None, bf16), None, bf16, shared_base=True).total == 0


def test_a_cpu_run_does_not_report_gpu_memory():
    """A CPU run's plan says where the weights are (host RAM), not "base weights on GPU: 0.00 GiB"."""
    _, est = memory.plan_memory(MemoryConfig(), memory.Workload(flux_config("flux1-dev") | {"num_layers": 1,
                                "num_single_layers": 1}), device="cpu")
    text = est.summary()
    assert "GPU" not in text and "host RAM" in text and "0.00 GiB" not in text
    host = estimate_host_ram(est, flux_config("flux1-dev") | {"num_layers": 1, "num_single_layers": 1}, MemoryConfig())
    assert host.training > 0 and host.base == est.weights


def test_time_floors_name_the_bound_and_auto_prefers_fewer_bytes_moved():
    """The 8gb plan moves ≈ 19 GB of fp8 blocks per step at 1024²; on a fast GPU that is the bound, and auto
    then takes nf4 blocks (half the bytes) with fewer of them swapped."""
    est = estimate_vram(None, memory.resolve_preset("8gb"), gpu_tflops=989)
    assert 18e9 < est.h2d_bytes < 20.5e9 and est.bound == "transfer-bound"
    assert est.step_floor_seconds == pytest.approx(est.h2d_bytes / 25e9)
    assert "transfer-bound" in est.summary()
    fast = memory.Workload(gpu_tflops=989)
    chosen = memory.resolve_preset("auto", free_bytes=7 * GiB, workload=fast)
    assert chosen.preset == "8gb" and chosen.base_precision == "nf4" and chosen.blocks_to_swap < 45
    assert fast.estimate(chosen).step_floor_seconds < est.step_floor_seconds
    # a knob the user set is never traded away
    kept = memory.resolve_preset("auto", {"base_precision": "fp8"}, free_bytes=7 * GiB, workload=fast)
    assert kept.base_precision == "fp8" and kept.blocks_to_swap == 45


def test_fp32_compute_counts_activations_at_four_bytes():
    bf16 = estimate_vram(None, MemoryConfig(gradient_checkpointing=True), compute_dtype="bf16")
    fp32 = estimate_vram(None, MemoryConfig(gradient_checkpointing=True), compute_dtype="fp32")
    assert fp32.activations == pytest.approx(2 * bf16.activations, rel=0.05)  # (the dry run's test measures it)
