"""CLI host-RAM rows: ``python -m bench ram``.

Writes BFL-format fixtures at full width — FLUX.1 (3072, 2 double + 3 single blocks, ≈ 2.2 GB in bf16) and FLUX.2
klein-4B-shaped (3072, 2 double + 4 single blocks, ≈ 2.2 GB) — and, in a fresh process per precision, loads each
the way ``train`` does (``family.load_transformer`` with the planned ``base_precision``: module by module from the
file to the final precision). Reports the process's peak RSS above its RSS before loading against the final
resident bytes of the model. Goal: peak ≤ 1.1 × final + 1 GiB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GiB = 2**30
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MARK = "<!-- ram -->"

_MEASURE = """
import json, sys
import psutil, torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, Flux2Transformer2DModel
from trainer_core.models.family import load_transformer
before = psutil.Process().memory_info().rss
precision = None if sys.argv[2] == "bf16" else sys.argv[2]
model = load_transformer(sys.argv[1], dtype=torch.bfloat16, base_precision=precision)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
final = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"before": before, "peak": peak, "final": final}))
"""


FIXTURES = {  # family → (description, the diffusers config's name and block counts)
    "FLUX.1": ("FLUX.1 BFL file, width 3072, 2 double + 3 single blocks", "flux1-dev", 2, 3),
    "FLUX.2": ("FLUX.2 klein-4B-shaped BFL file, width 3072, 2 double + 4 single blocks", "flux2-klein-4b", 2, 4),
}


def write_fixture(path: Path, family: str) -> int:
    import torch
    from safetensors.torch import save_file

    from trainer_core.models import flux, flux2
    from trainer_core.models.family import detect_family

    _, name, double, single = FIXTURES[family]
    config = dict(flux.flux_config(name) if family == "FLUX.1" else flux2.flux2_config(name),
                  num_layers=double, num_single_layers=single)
    with torch.device("meta"):
        model = detect_family(config).model_class()(**{k: v for k, v in config.items() if not k.startswith("_")})
    generator = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(t.shape, generator=generator) * 0.02).to(torch.bfloat16)
          for k, t in model.state_dict().items()}
    to_bfl = flux.diffusers_to_bfl if family == "FLUX.1" else flux2.diffusers_to_bfl
    save_file(to_bfl(sd), str(path))
    return path.stat().st_size


def measure(path: Path, precision: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), precision], capture_output=True, text=True,
                         cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ram", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=list(FIXTURES))
    parser.add_argument("--precisions", nargs="*", default=["bf16", "fp8", "nf4"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            path = Path(tmp) / "fixture.safetensors"
            size = write_fixture(path, family)
            for precision in args.precisions:
                m = measure(path, precision)
                grew, final = m["peak"] - m["before"], m["final"]
                goal = 1.1 * final + GiB
                ok &= grew <= goal
                rows.append(f"| {family} | {precision} | {size / GiB:.2f} | {final / GiB:.2f} | {grew / GiB:.2f} | "
                            f"{grew / final:.2f}× | {goal / GiB:.2f} | {'met' if grew <= goal else 'MISSED'} |")
                print(rows[-1], flush=True)
            path.unlink()
    fixtures = "; ".join(FIXTURES[f][0] for f in args.families)
    text = ("## CLI host RAM: streaming the base from the file to its precision\n\n"
            f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}; command: `python -m bench ram`. "
            f"Fixtures (bf16 random weights): {fixtures}. Each row loads one as `train` does "
            "(`family.load_transformer(..., base_precision=…)`) in a fresh process; peak = VmHWM − RSS before loading "
            "(torch, diffusers and accelerate already imported; bitsandbytes is imported by the nf4 load and counted)."
            "\n\n| family | precision | file GiB | final resident GiB | peak above start GiB | peak ÷ final | goal "
            "(1.1 × final + 1 GiB) | |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "The load streams module by module: one linear is in bf16 at a time (with the file pages it was read "
            "from), no longer a whole block — on FLUX.1's fixture, whose double block is 30 % of the model, that took "
            "fp8 from 1.71 to ≈ 1.3 GiB and nf4 from 1.76 GiB (0.06 GiB over its goal) to ≈ 1.4 GiB. What nf4 still "
            "costs here is bitsandbytes' CPU quantize kernel: ≈ 7× the linear it quantizes in temporaries (an fp32 "
            "copy, the scaled values, int32 codes; measured +1.16 GB for a 162 MiB bf16 linear), which FLUX.2's fused "
            "single-block projection (3072 × 27648) puts over the 1 GiB allowance on a CPU-only machine. With a GPU "
            "the trainer quantizes each linear on the GPU (`quantize_block_linears`) and the host holds only its bf16 "
            "copy.\n")
    print(text)
    if not args.no_write:
        from .dryrun import write_results

        write_results(text, MARK)
    return 0 if ok else 1
