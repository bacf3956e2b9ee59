#!/usr/bin/env python3
"""Speed and memory of every stage, against the number of frames and the working resolution.

For each configuration a fresh worker process writes a synthetic clip, preprocesses it
(frames, features, flow, masks, best_buddies), trains for a few iterations, builds the
refined-feature cache and answers 100 and 1,000 grid queries. Reported per stage: wall
seconds and peak resident memory (the process's VmHWM, reset at each stage start; memory
maps of the clip's arrays count while their pages are resident). Training is reported as
iterations per second with every loss term on (``train.refine_start=0``).

Before those sweeps, the issue-8 **target table**: each row our figure beside a same-run
baseline where one exists, the ratio, the reference implementation's figure from the issue,
and whether the target is met:

1. preprocessing at 238x420 (the ``cpu`` profile but that resolution: ViT-S/14 block 8,
   stride 7) for 16, 32 and 64 frames: seconds per stage, peak resident memory, the
   growth exponent from 16 to 64 frames, and the 16-frame speed-up over the reference;
2. training at the reference configuration (238x420, 1024-channel features, flow batch
   512, 4 x 256 pair points), before and after the refinement terms start: the default
   path (bf16 autocast where the CPU supports it, windowed head) beside the reference path
   (fp32, full-map head) for the same seed, iterations alternating, and the loss curves'
   largest relative difference;
3. and 5. from ``bench/results/paper.json`` (``bench/paper.py``: backbone against the GEMM
   limit, the paper profile);
4. query latency rows from ``bench/ros_service.py``'s ``query_latency_rows``.

Usage (from the repository root, project environment active)::

    python bench/speed.py            # targets, then frames 8/16/32/50 at height 224, ...
    python bench/speed.py --quick    # short versions of both parts
    python bench/speed.py --part targets   # only the target table (or --part sweep)
    python bench/speed.py --threads 1   # one torch thread (steadier on a loaded machine)

Each part stores its raw results (``bench/results/speed_targets.json``,
``speed_sweep.json``); ``speed.md`` is composed from both, so one part can be re-run alone.
Writes ``bench/results/speed.md``, ``speed.png`` (sweeps) and ``speed_targets.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "dino_tracker_ros"))  # the source tree, with or without env.sh
STAGES = ("frames", "features", "flow", "masks", "best_buddies", "training", "caching")


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    """Run every stage once for one configuration; return timings and peak memory."""
    import numpy as np
    import torch

    from dino_tracker_ros.core.config import load_config
    from dino_tracker_ros.core.predictor import Predictor, build_refined_cache, grid_queries
    from dino_tracker_ros.core.preprocess import Workspace
    from dino_tracker_ros.core.synthetic import make_synthetic_clip
    from dino_tracker_ros.core.trainer import train_clip

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = load_config(profile=spec["profile"], device="cpu", overrides={
        "backbone.random_init": True, "preprocess.height": spec["height"],
        "train.refine_start": 0, "train.checkpoint_every": 0,
    })
    out: dict = {"spec": spec, "seconds": {}, "peak_mib": {}}
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        clip, _ = make_synthetic_clip(tmp, num_frames=spec["frames"], height=spec["clip_h"],
                                      width=spec["clip_w"], seed=0)
        out["baseline_mib"] = round(_kib("VmRSS") / 1024, 1)
        state = {"stage": None, "t": 0.0}
        can_reset = _reset_peak()
        spans: dict = {}

        def close(stage: str | None) -> None:
            now = time.monotonic()
            if state["stage"] is not None:
                out["peak_mib"][state["stage"]] = round(_kib("VmHWM") / 1024, 1)
                spans[state["stage"]] = now - state["t"]
            _reset_peak()
            state["stage"], state["t"] = stage, now

        def progress(p) -> None:
            if p.stage != state["stage"]:
                close(p.stage)

        train_clip(clip, cfg, iterations=spec["iterations"], progress=progress)
        close(None)
        ws = Workspace(clip, cfg)
        rec = ws.record()["stages"]
        for stage in STAGES[:5]:
            out["seconds"][stage] = rec.get(stage, {}).get("seconds")
        # training: from its first report to the first caching report (steps after the
        # first iteration, so scaled by iterations / (iterations - 1))
        n_it = spec["iterations"]
        out["seconds"]["training"] = round(spans["training"] * n_it / max(n_it - 1, 1), 3)
        t1 = time.monotonic()
        _reset_peak()
        build_refined_cache(clip, device="cpu")
        out["seconds"]["caching"] = round(time.monotonic() - t1, 3)
        out["peak_mib"]["caching"] = round(_kib("VmHWM") / 1024, 1)
        out["iterations_per_s"] = round(spec["iterations"] / out["seconds"]["training"], 3)
        predictor = Predictor.open(clip, device="cpu")
        for n in (100, 1000):
            step = 1
            while len(grid_queries(clip.size, step + 1)) >= n:
                step += 1
            queries = grid_queries(clip.size, step)[:n]
            predictor.track(queries[:10])  # warm-up
            _reset_peak()
            t2 = time.monotonic()
            res = predictor.track(queries)
            out["seconds"][f"track_{n}"] = round(time.monotonic() - t2, 3)
            out["peak_mib"][f"track_{n}"] = round(_kib("VmHWM") / 1024, 1)
            out[f"visible_{n}"] = float(np.mean(res.visible))
        out["working_size"] = list(ws.size)
        out["grid"] = list(ws.geometry.grid_hw)
        out["peak_reset"] = can_reset
    return out


def prep_worker(spec: dict) -> dict:
    """Preprocess one synthetic clip; seconds per stage and the process's peak memory."""
    from dino_tracker_ros.core.config import load_config
    from dino_tracker_ros.core.preprocess import preprocess_clip
    from dino_tracker_ros.core.synthetic import make_synthetic_clip

    cfg = load_config(profile="cpu", device="cpu", overrides={
        "backbone.random_init": True, "preprocess.height": spec["height"],
        "preprocess.width": spec["width"]})
    with tempfile.TemporaryDirectory(prefix="bench_prep_") as tmp:
        clip, _ = make_synthetic_clip(tmp, num_frames=spec["frames"], height=spec["clip_h"],
                                      width=spec["clip_w"], seed=0)
        base = _kib("VmRSS")
        _reset_peak()
        t0, c0 = time.monotonic(), time.process_time()
        ws = preprocess_clip(clip, cfg)
        total, cpu = time.monotonic() - t0, time.process_time() - c0
        rec = ws.record()["stages"]
        return {"spec": spec, "seconds": round(total, 2), "cpu_seconds": round(cpu, 2),
                "stages": {k: v.get("seconds") for k, v in rec.items()},
                "peak_mib": round(_kib("VmHWM") / 1024, 1),
                "baseline_mib": round(base / 1024, 1)}


def _run_worker(spec: dict, kind: str = "stages") -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps({**spec, "kind": kind})],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> list[str]:
    cols = ["frames", "working HxW", "grid"] + [f"{s} s" for s in STAGES] + [
        "it/s", "track 100 s", "track 1000 s"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        s = r["seconds"]
        cells = [str(r["spec"]["frames"]), "x".join(map(str, r["working_size"])),
                 "x".join(map(str, r["grid"]))]
        cells += [f"{s[k]:.2f}" if s.get(k) is not None else "-" for k in STAGES]
        cells += [f"{r['iterations_per_s']:.2f}", f"{s['track_100']:.2f}",
                  f"{s['track_1000']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    cols = ["frames", "working HxW", "baseline MiB"] + [f"{s} MiB" for s in STAGES] + [
        "track 100 MiB", "track 1000 MiB"]
    lines += ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        p = r["peak_mib"]
        cells = [str(r["spec"]["frames"]), "x".join(map(str, r["working_size"])),
                 f"{r['baseline_mib']:.0f}"]
        cells += [f"{p[k]:.0f}" if p.get(k) is not None else "-"
                  for k in (*STAGES, "track_100", "track_1000")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plot(by_frames: list[dict], by_height: list[dict], path: Path) -> None:
    import matplotlib

    from dino_tracker_ros.core.storage import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, rows, xkey, xlabel in (
        (axes[0], by_frames, "frames", "frames T"),
        (axes[1], by_height, "height", "working height (px)"),
    ):
        xs = [r["spec"][xkey] for r in rows]
        for stage in (*STAGES, "track_1000"):
            ys = [r["seconds"].get(stage) or 0.0 for r in rows]
            ax.plot(xs, ys, marker="o", label=stage)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_title("time per stage vs frames")
    axes[1].set_title("time per stage vs resolution")
    axes[0].legend(fontsize=7)
    rows = by_frames
    xs = [r["spec"]["frames"] for r in rows]
    for stage in (*STAGES, "track_1000"):
        axes[2].plot(xs, [r["peak_mib"].get(stage) or 0.0 for r in rows], marker="o",
                     label=stage)
    axes[2].set_xlabel("frames T")
    axes[2].set_ylabel("peak RSS (MiB)")
    axes[2].set_title("peak memory per stage vs frames")
    axes[2].grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# -- issue 8 targets -----------------------------------------------------------------
REF_PREP_16_S, REF_PREP_16_GB = 815.0, 2.6
REF_TRAIN_S, REF_TRAIN_LATE_S = 5.0, 6.1
REF_VITL_S, REF_VITL_GB = 173.0, 14.6


def _paper_worker(spec: dict) -> dict:
    paper = Path(__file__).with_name("paper.py")
    proc = subprocess.run([sys.executable, str(paper), "--worker", "train", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_targets(quick: bool, frames: tuple[int, ...]) -> dict:
    """Measure targets 1, 2 (and fetch 4); returns the raw results."""
    out: dict = {"machine": describe_machine(), "quick": quick}
    t0 = time.monotonic()
    out["prep"] = []
    for t in frames:
        out["prep"].append(_run_worker({"frames": t, "height": 238, "width": 420,
                                        "clip_h": 240, "clip_w": 424}, "prep"))
        print(f"preprocess {t} frames: {out['prep'][-1]}", flush=True)
    out["train"] = {}
    for phase, rs in (("early", 10**6), ("late", 0)):
        out["train"][phase] = _paper_worker({
            "height": 238, "width": 420, "clip_h": 240, "clip_w": 424, "frames": 8,
            "iterations": 1 if quick else 2, "bb_pairs": 2, "refine_start": rs})
        print(f"training {phase}: {out['train'][phase]['s_per_it']}", flush=True)
    try:
        from ros_service import query_latency_rows

        out["query"] = query_latency_rows("cpu", True)
    except Exception as exc:  # noqa: BLE001 - the table says why the rows are missing
        out["query"] = None
        out["query_error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _exponent(rows: list[dict], key: str = "seconds") -> float:
    a, b = rows[0], rows[-1]
    return math.log(b[key] / a[key]) / math.log(b["spec"]["frames"] / a["spec"]["frames"])


def _target_lines(tg: dict, paper: dict | None) -> list[str]:
    prep = tg["prep"]
    expo, expo_cpu = _exponent(prep), _exponent(prep, "cpu_seconds")
    p16 = next((r for r in prep if r["spec"]["frames"] == 16), None)
    rows = ["| target | measured | same-run baseline | ratio | reference (issue 8) | met | why |",
            "|---|---|---|---|---|---|---|"]
    if p16 is not None:
        speedup = REF_PREP_16_S / p16["seconds"]
        rows.append(
            f"| 1. preprocess 16 frames 238x420 (ViT-S/14 s7) | {p16['seconds']:.1f} s wall "
            f"({p16['cpu_seconds']:.0f} CPU-s), peak {p16['peak_mib'] / 1024:.2f} GiB | - | "
            f"{speedup:.1f}x faster than the reference "
            f"| {REF_PREP_16_S:.0f} s, {REF_PREP_16_GB} GB | {'yes' if speedup >= 10 else 'no'} "
            "| >= 10x in wall time on the shared machine; CPU-s / 2 cores estimates an idle "
            "machine's wall time |")
    rows.append(
        f"| 1. preprocessing growth {prep[0]['spec']['frames']}->{prep[-1]['spec']['frames']} "
        f"frames | exponent {expo:.2f} wall, {expo_cpu:.2f} CPU time | - | - | ~T^1.4-2.0 | "
        f"{'yes' if expo_cpu <= 1.1 else 'no'} "
        "| <= 1.1; every stage is linear in T (fixed partners per frame) |")
    for phase, ref in (("early", REF_TRAIN_S), ("late", REF_TRAIN_LATE_S)):
        t = tg["train"][phase]
        ours, base = t["s_per_it"]["opt"], t["s_per_it"]["base"]
        ratio = base / ours
        label = ("before refine_start" if phase == "early"
                 else "all terms (cycle + refined bb)")
        rows.append(
            f"| 2. training 238x420, C=1024, batch 512, {label} | {ours:.2f} s/it | "
            f"{base:.2f} s/it (fp32, full-map head) | {ratio:.2f}x | {ref} s/it | "
            f"{'yes' if ratio >= 3 else 'no'} | >= 3x vs the same-run fp32 path (the reference "
            f"figure is from an idle machine); loss curves max rel. diff "
            f"{t['loss']['max_rel_diff']} |")
    if paper:
        for r in paper["backbone"]:
            s = r["spec"]
            for prec, run in r["runs"].items():
                ok = run["ratio_to_limit"] <= 2.0
                rows.append(
                    f"| 3. {s['model']} s7 {s['height']}x{s['width']} {prec} | "
                    f"{run['seconds']:.2f} s, peak {run['peak_mib']:.0f} MiB | GEMM limit "
                    f"{run['gemm_limit_s']:.2f} s | {run['ratio_to_limit']:.2f}x the limit | "
                    + (f"{REF_VITL_S:.0f} s, {REF_VITL_GB} GB" if s["model"] == "dinov2_vitl14"
                       and s["height"] == 476 else "-")
                    + f" | {'yes' if ok else 'no'} | <= 2x the limit; attention maps would be "
                    f"{r['attn_map_mib']:.0f} MiB per layer (SDPA never builds them) |")
        acc = paper["backbone"][0]["bf16_vs_fp32"]
        rows.append(f"| 3. bf16 vs fp32 features | mean cosine {acc['cos_mean']}, min "
                    f"{acc['cos_min']}, rel. RMS {acc['rel_rms']} | fp32 | - | - | measured | "
                    "bf16 is the default where the CPU/GPU has it; fp32 selectable |")
        tr = paper["train"]
        gib = tr["step_peak_mib"]["opt"] / 1024
        rows.append(
            f"| 5. paper profile training {tr['spec']['height']}x{tr['spec']['width']} | "
            f"{tr['s_per_it']['opt']:.1f} s/it, step peak {gib:.2f} GiB | "
            f"{tr['s_per_it']['base']:.1f} s/it (fp32, full map) | "
            f"{tr['s_per_it']['base'] / tr['s_per_it']['opt']:.2f}x | 28-37 s/it, 9.6 GB | "
            f"{'yes' if gib < 12 else 'no'} (memory) | < 12 GB: step memory does not depend on "
            "T (4 frames per iteration); modelled from CPU memory, no GPU here |")
        disk = paper["model"]["disk_total_gib"]
        rows.append(
            f"| 5. paper clip cache on disk, 50 frames | {disk:.2f} GiB (modelled from exact "
            f"per-frame sizes) | - | - | ~6 GB per video | {'yes' if disk <= 2 else 'no'} | "
            "<= 2 GB: fp16 features and refined cache, compact flow tracks |")
    else:
        rows.append("| 3., 5. | run `python bench/paper.py` | | | | | |")
    if tg.get("query"):
        for q in tg["query"]:
            rows.append(
                f"| 4. query {q['points']} points x {q['frames']} frames ({q['profile']}) "
                f"through ROS | {q['ros_s']:.3f} s | {q['baseline_core_s']:.3f} s (previous "
                f"core) | {q['speedup']:.2f}x (core) | 0.2 s per point + 2.9 s visibility | "
                f"{'yes' if q['met'] else 'no'} | < {q['target_s']:g} s |")
    else:
        rows.append("| 4. query latency through ROS | see ros_service.md | | | | | "
                    f"({tg.get('query_error', 'not run')}) |")
    lines = ["## Issue 8 targets", "", *rows, "",
             "| frames (238x420) | total s | CPU s | " + " | ".join(
                 f"{k} s" for k in prep[0]["stages"]) + " | peak RSS MiB |",
             "|---" * (4 + len(prep[0]["stages"])) + "|"]
    for r in prep:
        lines.append(f"| {r['spec']['frames']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     + " | ".join(f"{v:.1f}" for v in r["stages"].values())
                     + f" | {r['peak_mib']:.0f} |")
    for phase, t in tg["train"].items():
        lines += ["", f"Training losses ({phase}), reference path: {t['loss']['base']}; "
                      f"default path: {t['loss']['opt']}."]
    return lines


def _targets_plot(tg: dict, path: Path) -> None:
    import matplotlib

    from dino_tracker_ros.core.storage import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    prep = tg["prep"]
    xs = [r["spec"]["frames"] for r in prep]
    axes[0].loglog(xs, [r["seconds"] for r in prep], "o-", label="preprocessing (ours), wall")
    axes[0].loglog(xs, [r["cpu_seconds"] for r in prep], "o:", label="(ours), CPU seconds")
    axes[0].loglog([4, 8, 16], [50, 316, 815], "s--", label="reference (issue 8)")
    axes[0].set_xlabel("frames (238x420)")
    axes[0].set_ylabel("seconds")
    axes[0].set_title(f"preprocessing vs frames: exponent {_exponent(prep):.2f} wall, "
                      f"{_exponent(prep, 'cpu_seconds'):.2f} CPU")
    axes[0].legend()
    axes[0].grid(True, which="both", alpha=0.3)
    names, ours, base = [], [], []
    for phase, t in tg["train"].items():
        names.append(phase)
        ours.append(t["s_per_it"]["opt"])
        base.append(t["s_per_it"]["base"])
    idx = range(len(names))
    axes[1].bar([i - 0.2 for i in idx], base, 0.4, label="fp32, full-map head (same run)")
    axes[1].bar([i + 0.2 for i in idx], ours, 0.4, label="default (bf16, windowed head)")
    axes[1].plot([-0.4, 0.4], [REF_TRAIN_S] * 2, "k--", label="reference (issue 8)")
    axes[1].plot([0.6, 1.4], [REF_TRAIN_LATE_S] * 2, "k--")
    axes[1].set_xticks(list(idx), [f"training, {n} terms" for n in names])
    axes[1].set_ylabel("seconds per iteration (238x420, C=1024)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--part", choices=("all", "targets", "sweep", "report"), default="all",
                        help="which part to (re)measure (report: none, only rewrite speed.md "
                             "from the stored results); speed.md always shows both")
    parser.add_argument("--profile", default="cpu", help="configuration profile (default cpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training iterations timed per configuration")
    parser.add_argument("--prep-frames", default="16,32,64",
                        help="clip lengths of the preprocessing target (default 16,32,64)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        job = {"stages": worker, "prep": prep_worker}[spec.pop("kind")]
        print(json.dumps(job(spec)))
        return
    from dino_tracker_ros.core.storage import write_bytes_atomic

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.part in ("all", "targets"):
        frames = tuple(int(t) for t in args.prep_frames.split(","))
        tg = run_targets(args.quick, (8, 16) if args.quick else frames)
        write_bytes_atomic(RESULTS / "speed_targets.json", (json.dumps(tg, indent=1) + "\n"
                                                            ).encode())
    if args.part in ("all", "sweep"):
        sweep = run_sweep(args)
        write_bytes_atomic(RESULTS / "speed_sweep.json", (json.dumps(sweep, indent=1) + "\n"
                                                          ).encode())
    tg = _load(RESULTS / "speed_targets.json")
    sweep = _load(RESULTS / "speed_sweep.json")
    lines = ["# Speed and memory", ""]
    if tg:
        _targets_plot(tg, RESULTS / "speed_targets.png")
        prep_frames = ",".join(str(r["spec"]["frames"]) for r in tg["prep"])
        lines += [f"Targets: `python bench/speed.py --part targets"
                  f"{' --quick' if tg['quick'] else f' --prep-frames {prep_frames}'}` "
                  f"({tg['seconds']:.0f} s). Machine: "
                  f"{tg['machine']}. Randomly initialised backbones (same cost as real "
                  "weights); 2 cores shared with other jobs while measured, so compare the "
                  "same-run columns. Plot: `speed_targets.png`.", "",
                  *_target_lines(tg, _load(RESULTS / "paper.json")), ""]
    if sweep:
        lines += sweep["lines"]
    write_bytes_atomic(RESULTS / "speed.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'speed.md'}")


def run_sweep(args: argparse.Namespace) -> dict:
    """The per-stage sweeps over frames and resolution; returns their markdown lines."""
    if args.quick:
        frames, heights, base_t, base_h, iters = (8, 16), (112, 168), 8, 112, 10
    else:
        frames, heights, base_t, base_h, iters = (8, 16, 32, 50), (112, 168, 224), 16, 224, 20
    iters = args.iterations or iters
    machine = describe_machine()
    clip_h, clip_w = 240, 320

    def spec(t: int, h: int) -> dict:
        return {"profile": args.profile, "frames": t, "height": h, "clip_h": clip_h,
                "clip_w": clip_w, "iterations": iters, "threads": args.threads}

    t0 = time.monotonic()
    by_frames = []
    for t in frames:
        by_frames.append(_run_worker(spec(t, base_h)))
        print(f"frames {t}: {by_frames[-1]['seconds']}", flush=True)
    by_height = []
    for h in heights:
        hit = next((r for r in by_frames if r["spec"] == spec(base_t, h)), None)
        by_height.append(hit or _run_worker(spec(base_t, h)))
        print(f"height {h}: {by_height[-1]['seconds']}", flush=True)
    cmd = "python bench/speed.py --part sweep" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads else "") + (
        f" --iterations {args.iterations}" if args.iterations else "") + (
        f" --profile {args.profile}" if args.profile != "cpu" else "")
    lines = [
        "## Per-stage sweeps",
        "",
        f"Command: `{cmd}` ({time.monotonic() - t0:.0f} s in all). Machine: {machine}.",
        "",
        f"Profile `{args.profile}` with a **randomly initialised** backbone (no pretrained "
        f"weights offline: same cost as real weights), synthetic {clip_w}x{clip_h} clips, "
        f"{iters} training iterations timed with every loss term on, device cpu. Peak memory "
        "is the worker process's resident-set high-water mark within each stage (includes "
        "the Python/torch baseline, given as its own column, and resident pages of memory "
        "maps).",
        "",
        f"### Against the number of frames (working height {base_h})",
        "",
        *_table(by_frames),
        "",
        f"### Against the working resolution ({base_t} frames)",
        "",
        *_table(by_height),
        "",
        "Query latency: `Predictor.track` on a grid of 100 or 1,000 points of frame 0, "
        "all frames, visibility included (cache already built).",
    ]
    _plot(by_frames, by_height, RESULTS / "speed.png")
    return {"lines": lines, "by_frames": by_frames, "by_height": by_height}


if __name__ == "__main__":
    main()
