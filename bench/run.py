"""One command, one table: ``python -m bench`` (GPU mode when CUDA is available, else CPU mode).

GPU mode: full-size FLUX.1-dev with random weights at 512² and 1024², rank 16, batch 1; for every preset
(each capped to its card size), a "24 GiB card" row (auto, process capped to 24 GiB) and the plain
diffusers + peft baseline, and our step on 1 GPU vs every visible GPU (``bench/data_parallel.py``). CPU mode: the
tiny model, our step against the baseline loop, peak RSS.
Every row runs in a fresh process. The table is printed and written to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import sys
import traceback
from pathlib import Path

from .workloads import RowSpec, machine, measure

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TIERS = ("8gb", "12gb", "16gb", "24gb", "48gb", "80gb")
MFU_FORMULA = ("MFU = 2 × forward FLOPs (every linear layer + attention QKᵀ/AV, counted exactly: 74.4 TFLOP at "
               "1024², 21.5 at 512²; recomputation and LoRA not counted) / median s/step / measured peak bf16 "
               "matmul FLOP/s")


def _child(fn, arg, queue) -> None:
    try:
        queue.put(fn(arg))
    except BaseException as exc:  # an OOM or a crash is a result too: report it in the table
        queue.put(dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                       trace=traceback.format_exc()))


def in_child(fn, arg):
    """``fn(arg)`` in a fresh process (its own CUDA context and memory peaks; none is left in this one)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, arg, queue))
    proc.start()
    try:
        result = queue.get()
    except KeyboardInterrupt:
        proc.terminate()
        raise
    proc.join()
    return result


def run_row(spec: RowSpec) -> dict:
    result = in_child(measure, spec)
    if "error" in result:
        result.update(label=spec.label, kind=spec.kind, resolution=spec.resolution, preset=spec.preset)
        print(f"  {spec.label} @ {spec.resolution}: {result['error']}", file=sys.stderr)
    return result


def gpu_rows(args) -> list[RowSpec]:
    rows = []
    common = dict(model=args.model, device=args.device, warmup=args.warmup, steps=args.steps,
                  compute_dtype="bf16" if args.device == "cuda" else "fp32")
    for res in args.resolutions:
        rows.append(RowSpec("baseline: diffusers + peft", "baseline", res, **common))
        for tier in args.presets:
            rows.append(RowSpec(f"preset {tier}", "ours", res, preset=tier,
                                cap_gib=float(tier.removesuffix("gb")) if args.device == "cuda" else 0.0,
                                warmup=args.warmup + (3 if tier in ("48gb", "80gb") else 0),  # compile
                                **{k: v for k, v in common.items() if k != "warmup"}))
        rows.append(RowSpec("24 GiB card (auto, capped)", "ours", res, preset="auto",
                            cap_gib=24.0 if args.device == "cuda" else 0.0, **common))
    return rows


def cpu_rows(args) -> list[RowSpec]:
    common = dict(model="tiny", device="cpu", compute_dtype="fp32", warmup=args.warmup, steps=args.steps, rank=8)
    res = args.resolutions[0]
    return [
        RowSpec("ours vs baseline", "pair", res, checkpointing=False, overrides=dict(base_precision="fp32"), **common),
        RowSpec("ours vs baseline, both checkpointing", "pair", res, checkpointing=True,
                overrides=dict(base_precision="fp32", gradient_checkpointing=True), **common),
        RowSpec("ours (checkpointing + all blocks swapped + activations offloaded) vs baseline (checkpointing)",
                "pair", res, checkpointing=True,
                overrides=dict(base_precision="fp32", gradient_checkpointing=True, blocks_to_swap=57,
                               offload_activations=True), **common),
    ]


def _fmt(value, spec="{:.2f}", missing="–"):
    return missing if value is None else spec.format(value)


def gpu_table(results: list[dict], peak_tflops: float | None, model: str) -> tuple[str, list[str]]:
    from trainer_core.memory import flux_forward_flops

    from .workloads import model_config

    config = model_config(model)
    text_tokens = 16 if model == "tiny" else 512
    baseline = {r["resolution"]: r for r in results if r["kind"] == "baseline" and "error" not in r}
    lines = ["| run | res | knobs | peak alloc GiB | peak reserved GiB | estimate GiB (error) | s/step | MFU | "
             "speed vs baseline | host RSS GiB |", "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['resolution']}² | – | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        flops = 2 * flux_forward_flops(config, resolution=r["resolution"], text_tokens=text_tokens)
        mfu = flops / r["seconds"] / (peak_tflops * 1e12) if peak_tflops else None
        r["mfu"] = mfu
        est = r.get("estimate_gib")
        peak = r.get("peak_gib")
        err = f" ({(est - peak) / peak * 100:+.0f} %)" if est is not None and peak else ""
        base = baseline.get(r["resolution"])
        ratio = base["seconds"] / r["seconds"] if base else None
        r["speedup"] = ratio
        label = r["label"] + (f" → {r['tier']}" if r["preset"] == "auto" else "")
        lines.append(
            f"| {label} | {r['resolution']}² | {r['knobs']} | {_fmt(peak)} | {_fmt(r.get('reserved_gib'))} | "
            f"{_fmt(est)}{err} | {r['seconds']:.3f} | {_fmt(mfu, '{:.0%}')} | {_fmt(ratio, '{:.2f}×')} | "
            f"{r['rss_gib']:.1f} |" + ("" if r["finite"] else " (non-finite loss)"))
    return "\n".join(lines), _gpu_goals(results, baseline)


def _gpu_goals(results: list[dict], baseline: dict) -> list[str]:
    ok = [r for r in results if "error" not in r and r["kind"] == "ours"]

    def row(label, res):
        return next((r for r in ok if r["label"].startswith(label) and r["resolution"] == res), None)

    def check(name, value, target, fmt, higher=False):
        if value is None:
            return f"- {name}: not measured"
        met = value >= target if higher else value <= target
        return f"- {name}: {fmt.format(value)} (goal {'≥' if higher else '≤'} {fmt.format(target)}) — {'met' if met else 'NOT met'}"

    goals = [
        check("peak at 1024², lowest preset", (row("preset 8gb", 1024) or {}).get("peak_gib"), 6.0, "{:.2f} GiB"),
        check("peak at 512², lowest preset", (row("preset 8gb", 512) or {}).get("peak_gib"), 4.0, "{:.2f} GiB"),
        check("MFU unconstrained (80gb, 1024²)", (row("preset 80gb", 1024) or {}).get("mfu"), 0.55, "{:.0%}", True),
        check("MFU in a 24 GiB cap (1024²)", (row("24 GiB card", 1024) or {}).get("mfu"), 0.45, "{:.0%}", True),
        check("MFU in an 8 GiB cap (8gb, 1024²)", (row("preset 8gb", 1024) or {}).get("mfu"), 0.30, "{:.0%}", True),
    ]
    for res, base in sorted(baseline.items()):
        equal = [r for r in ok if r["resolution"] == res and r.get("peak_gib") and r["peak_gib"] <= base.get("peak_gib", 0)]
        best = max(equal, key=lambda r: r["speedup"] or 0, default=None)
        goals.append(check(f"speed vs baseline at ≤ its memory ({res}², best: {best['label'] if best else '–'})",
                           best["speedup"] if best else None, 1.5, "{:.2f}×", True))
    errors = [abs(r["estimate_gib"] - r["peak_gib"]) / r["peak_gib"] for r in ok if r.get("peak_gib")]
    goals.append(check("worst VRAM estimate error", max(errors) if errors else None, 0.10, "{:.0%}"))
    return goals


def cpu_table(results: list[dict]) -> tuple[str, list[str]]:
    lines = ["| run | ours s/step | baseline s/step | overhead (ours ÷ baseline) | peak RSS GiB |",
             "|---|---|---|---|---|"]
    goals = []
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |  |  |  |")
            continue
        ratio = r["seconds"] / r["baseline_seconds"]
        lines.append(f"| {r['label']} | {r['seconds'] * 1000:.1f} ms | {r['baseline_seconds'] * 1000:.1f} ms | "
                     f"{ratio:.3f}× | {r['rss_gib']:.2f} |")
        goals.append(f"- CPU overhead, {r['label']}: {ratio:.3f}× (goal ≤ 1.00×) — {'met' if ratio <= 1.0 else 'NOT met'}")
    return "\n".join(lines), goals


def write_results(mode: str, text: str) -> None:
    """Replace this mode's section of bench/RESULTS.md (the other mode's latest table stays)."""
    from trainer_core.fileio import atomic_path

    sections = {"gpu": "", "cpu": ""}
    if RESULTS.exists():
        current = None
        for line in RESULTS.read_text(encoding="utf-8").splitlines(keepends=True):
            marker = line.strip()
            if marker in ("<!-- gpu -->", "<!-- cpu -->"):
                current = marker[5:8]
            elif current:
                sections[current] += line
    sections[mode] = text.replace("# Benchmark", "## Benchmark", 1)
    body = "# Benchmark results\n\nWritten by `python -m bench`; each mode keeps its latest run.\n\n"
    body += "".join(f"<!-- {m} -->\n{sections[m].strip()}\n\n" for m in ("gpu", "cpu") if sections[m].strip())
    with atomic_path(RESULTS) as tmp:
        tmp.write_text(body, encoding="utf-8")


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--resolutions", type=int, nargs="+", default=None)
    parser.add_argument("--presets", nargs="+", default=list(TIERS), choices=TIERS)
    parser.add_argument("--steps", type=int, default=None, help="timed steps after warm-up (≥ 10 on a GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", default="flux1-dev", help="GPU mode model: flux1-dev, or tiny to dry-run the table")
    parser.add_argument("--device", default=None, help="GPU mode device (cpu only for a dry run with --model tiny)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = parser.parse_args(argv)
    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    args.device = args.device or ("cuda" if mode == "gpu" else "cpu")
    if mode == "gpu":
        args.resolutions = args.resolutions or [512, 1024]
        args.steps = args.steps or 10
        rows = gpu_rows(args)
    else:
        args.resolutions = args.resolutions or [256]
        args.steps = args.steps or 30
        rows = cpu_rows(args)

    peak = None
    if mode == "gpu" and args.device == "cuda":
        from .workloads import peak_bf16_matmul_tflops

        peak = in_child(peak_bf16_matmul_tflops, "cuda")
        if isinstance(peak, dict):
            raise SystemExit(f"could not measure the bf16 matmul peak: {peak['error']}")
        print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s", file=sys.stderr)
    results = []
    for spec in rows:
        print(f"running {spec.label} @ {spec.resolution}² …", file=sys.stderr)
        results.append(run_row(spec))

    if mode == "gpu":
        from .data_parallel import rows as data_parallel_rows

        table, goals = gpu_table(results, peak, args.model)
        table = "\n".join([table, *data_parallel_rows(args)])
        notes = [MFU_FORMULA + (f"; peak measured here: {peak:.0f} TFLOP/s." if peak else "."),
                 "Host RSS includes the random bf16 model the benchmark builds in RAM (≈ 24 GB) before "
                 "preparing it."]
        title = f"GPU mode: {'FLUX.1-dev (random weights)' if args.model != 'tiny' else 'tiny model (dry run)'}, " \
                f"rank 16, batch 1, {args.steps} timed steps after warm-up"
    else:
        table, goals = cpu_table(results)
        notes = ["Tiny FLUX (4 blocks, width 32), fp32 on one CPU thread, rank 8, batch 1. Each row builds our "
                 "training step (trainer_core.train.TrainingSession) and the plain diffusers + peft loop in one "
                 "process and alternates their steps; s/step is the median of the timed steps. Peak RSS is the "
                 "process's (both models)."]
        title = f"CPU mode: tiny model at {args.resolutions[0]}², {args.steps} timed steps after warm-up"
    text = "\n".join([
        f"# Benchmark: {title}", "",
        f"Machine: {machine(args.device)}", f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"Command: `python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}`".replace("  ", " "), "",
        table, "", *notes, "", "Goals:", *goals, "",
    ])
    print(text)
    if not args.no_write:
        write_results(mode, text)
    return 0 if all("error" not in r for r in results) else 1
