"""One command, one table: ``python -m bench`` (GPU mode when CUDA is available, else CPU mode).

GPU mode: a full-size transformer with random weights (``--model``: FLUX.1-dev by default, or FLUX.2 klein-4B,
klein-9B, dev) at 512² and 1024², rank 16, batch 1; for every preset of that model
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

from .workloads import MODELS, TINY_MODELS, RowSpec, machine, measure, model_config, text_tokens

TIERS = ("8gb", "12gb", "16gb", "24gb", "48gb", "80gb")
# The card each FLUX.2 model must train in at 1024² (issue 11: klein-4B within 8 GB, klein-9B within 12 GB, dev
# within 24 GB). The row runs capped to the card, so an overrun is an OOM; the goal is the tier's own budget: peak
# reserved ≤ the card less the 1 GiB the tiers leave for the CUDA context (which the allocator does not count).
# tiny-flux2 takes klein-4B's tiers.
FLUX2_FIT = {"flux2-klein-4b": "8gb", "flux2-klein-9b": "12gb", "flux2-dev": "24gb", "tiny-flux2": "8gb"}
CUDA_CONTEXT_GIB = 1.0


def mfu_formula(model: str, resolutions) -> str:
    from trainer_core.memory import flux_forward_flops

    config = model_config(model)
    counted = ", ".join(f"{flux_forward_flops(config, resolution=r, text_tokens=text_tokens(model)) / 1e12:.1f} "
                        f"TFLOP at {r}²" for r in sorted(resolutions, reverse=True))
    return (f"MFU = 2 × forward FLOPs (every linear layer + attention QKᵀ/AV, counted exactly for {model}: "
            f"{counted}; recomputation and LoRA not counted) / median s/step / measured peak bf16 matmul FLOP/s")


def model_gb(model: str) -> float:
    """Size of the model's bf16 weights (GB): what the benchmark builds in host RAM for each of our rows."""
    import torch

    from trainer_core.models.family import detect_family

    config = model_config(model)
    with torch.device("meta"):
        transformer = detect_family(config).model_class()(**config)
    return sum(p.numel() for p in transformer.parameters()) * 2 / 1e9


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
        if args.baseline:
            rows.append(RowSpec("baseline: diffusers + peft", "baseline", res, **common))
        for tier in args.presets:
            rows.append(RowSpec(f"preset {tier}", "ours", res, preset=tier,
                                cap_gib=float(tier.removesuffix("gb")) if args.device == "cuda" else 0.0,
                                warmup=args.warmup + (3 if tier in ("48gb", "80gb") else 0),  # compile
                                **{k: v for k, v in common.items() if k != "warmup"}))
        if args.card:
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

    config = model_config(model)
    tokens = text_tokens(model)
    baseline = {r["resolution"]: r for r in results if r["kind"] == "baseline" and "error" not in r}
    lines = ["| run | res | knobs | peak alloc GiB | peak reserved GiB | estimate GiB (error) | s/step | MFU | "
             "speed vs baseline | host RSS GiB |", "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['resolution']}² | – | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        flops = 2 * flux_forward_flops(config, resolution=r["resolution"], text_tokens=tokens)
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
    return "\n".join(lines), _gpu_goals(results, baseline, model)


def _gpu_goals(results: list[dict], baseline: dict, model: str) -> list[str]:
    ok = [r for r in results if "error" not in r and r["kind"] == "ours"]

    def row(label, res):
        return next((r for r in ok if r["label"].startswith(label) and r["resolution"] == res), None)

    def check(name, value, target, fmt, higher=False):
        if value is None:
            return f"- {name}: not measured"
        met = value >= target if higher else value <= target
        return f"- {name}: {fmt.format(value)} (goal {'≥' if higher else '≤'} {fmt.format(target)}) — {'met' if met else 'NOT met'}"

    if model in FLUX2_FIT:
        tier = FLUX2_FIT[model]
        card = float(tier.removesuffix("gb"))
        goals = [check(f"peak reserved at 1024², preset {tier} (the {card:.0f} GiB card less "
                       f"{CUDA_CONTEXT_GIB:.0f} GiB for the CUDA context)",
                       (row(f"preset {tier}", 1024) or {}).get("reserved_gib"), card - CUDA_CONTEXT_GIB, "{:.2f} GiB")]
    else:  # FLUX.1-dev (and the tiny FLUX.1)
        goals = [
            check("peak at 1024², lowest preset", (row("preset 8gb", 1024) or {}).get("peak_gib"), 6.0, "{:.2f} GiB"),
            check("peak at 512², lowest preset", (row("preset 8gb", 512) or {}).get("peak_gib"), 4.0, "{:.2f} GiB"),
            check("MFU unconstrained (80gb, 1024²)", (row("preset 80gb", 1024) or {}).get("mfu"), 0.55, "{:.0%}",
                  True),
            check("MFU in a 24 GiB cap (1024²)", (row("24 GiB card", 1024) or {}).get("mfu"), 0.45, "{:.0%}", True),
            check("MFU in an 8 GiB cap (8gb, 1024²)", (row("preset 8gb", 1024) or {}).get("mfu"), 0.30, "{:.0%}",
                  True),
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


def write_results(mark: str, text: str) -> None:
    """Replace the section under ``mark`` of bench/RESULTS.md (each mode, and each model in GPU mode, keeps its
    latest run; the other sections stay)."""
    from .dryrun import write_results as write_section

    write_section(text.replace("# Benchmark", "## Benchmark", 1), mark)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--resolutions", type=int, nargs="+", default=None)
    parser.add_argument("--presets", nargs="+", default=list(TIERS), choices=TIERS)
    parser.add_argument("--steps", type=int, default=None, help="timed steps after warm-up (≥ 10 on a GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", default="flux1-dev", choices=MODELS,
                        help="GPU mode model (random weights of its full-size config); tiny or tiny-flux2 to dry-run "
                             "the table's code with --device cpu")
    parser.add_argument("--device", default=None, help="GPU mode device (cpu only for a dry run with a tiny model)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="GPU mode: the diffusers + peft baseline row at each resolution")
    parser.add_argument("--card", action=argparse.BooleanOptionalAction, default=True,
                        help='GPU mode: the "24 GiB card" row (preset auto, capped) at each resolution')
    parser.add_argument("--no-write", action="store_true",
                        help="print only; leave bench/RESULTS.md as it is (a GPU-mode dry run on the CPU never "
                             "writes it)")
    args = parser.parse_args(argv)
    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    args.device = args.device or ("cuda" if mode == "gpu" else "cpu")
    if mode == "gpu" and args.device == "cpu" and args.model not in TINY_MODELS:
        parser.error(f"--device cpu runs GPU mode's table only as a dry run with a tiny model "
                     f"({' or '.join(TINY_MODELS)}), not {args.model}")
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
        notes = [mfu_formula(args.model, args.resolutions)
                 + (f"; peak measured here: {peak:.0f} TFLOP/s." if peak else "."),
                 f"Host RSS includes the random bf16 model the benchmark builds in RAM (≈ {model_gb(args.model):.1f} "
                 "GB) before preparing it."]
        what = f"{args.model} (random weights)" if args.model not in TINY_MODELS else f"{args.model} (dry run)"
        title = f"GPU mode: {what}, rank 16, batch 1, {args.steps} timed steps after warm-up"
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
    dry_run = mode == "gpu" and args.device != "cuda"
    if not args.no_write and not dry_run:
        write_results(f"<!-- gpu {args.model} -->" if mode == "gpu" else "<!-- cpu -->", text)
    return 0 if all("error" not in r for r in results) else 1
