"""Gathers what ``bench/gpu_check.sh`` measured into ``summary.md`` and ``summary.json``, checked against
issue 12's targets, and copies ``reproduce.png`` beside them.

    python bench/gpu_summary.py WORK_DIR OUT_DIR [--seconds N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import reproduce as rp  # bench/reproduce.py: the same table and plot for the merged runs

# Fit wall time excluding compile/warm-up, on one H100/H200 (issue 12).
FIT_TARGETS_S = {"scratch": 60, "finetune": 30, "fast": 15}
FRAMEWORK_TARGET = 0.90  # Lightning fit images/s over the bare loop's
GRAPHED_TARGET = 0.95  # Lightning's graphed step against a bare loop of the same CUDA graphs (issue 17)
BUSY_TARGET = 0.95
AROUND_TARGET = 0.05  # host time on figures and checkpoints, share of the fit's wall time (issue 18)
STARTUP_TARGET_S = 5  # command to first training step, excluding compile (issue 18)


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sections(work: Path) -> list[dict[str, Any]]:
    """Each section's exit code (or ``skipped``) and seconds, from ``sections.tsv``."""
    path = work / "sections.tsv"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds = line.split("\t")
        rows.append({"name": name, "exit": rc, "seconds": int(seconds)})
    return rows


def verdict(value: float | None, target: float, higher_is_better: bool, unit: str = "", scale: float = 1) -> str:
    """``met`` or ``missed by ...`` (or ``not measured``)."""
    if value is None:
        return "not measured"
    gap = (target - value) if higher_is_better else (value - target)
    return "met" if gap <= 0 else f"missed by {scale * gap:.3g}{unit}"


def fit_targets(reproduce: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each recipe's fit time without warm-up against its target (projected for a run stopped at the budget)."""
    rows = []
    for run in (reproduce or {}).get("runs", []):
        target = FIT_TARGETS_S.get(run["recipe"])
        if target is None or run["seed"] != 0:
            continue
        value, note = run.get("fit_s_excl_warmup"), ""
        if run["status"] == "stopped" and run.get("projected_fit_s") is not None:
            value = run["projected_fit_s"] - (run.get("warmup_s") or 0)
            note = f" (projected: stopped after {run['epochs']} of {run.get('max_epochs')} epochs)"
        elif run["status"] != "ok":
            value, note = None, f" ({run['status']})"
        if value is not None and run.get("train_s") is not None and run.get("fit_s"):
            note += (f"; of the {run['fit_s']:.1f} s run, {run['train_s']:.1f} s were training epochs, the rest "
                     f"validation, figures and checkpoints; {run.get('images_per_s') or 0:,.0f} train images/s")  # fmt: skip
        rows.append({"target": f"{run['recipe']}: fit without warm-up <= {target} s", "value": value,
                     "shown": "—" if value is None else f"{value:.1f} s{note}", "verdict": verdict(value, target, False, " s")})  # fmt: skip
    return rows


def around_step_targets(reproduce: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 18: per recipe, the training thread's time on figures and checkpoints against the fit, and start-up."""
    rows = []
    for run in (reproduce or {}).get("runs", []):
        if run["seed"] != 0 or run["status"] != "ok":
            continue
        fit, around = run.get("fit_s"), [run.get("figures_s"), run.get("checkpoint_s")]
        share = sum(v or 0 for v in around) / fit if fit and any(v is not None for v in around) else None
        startup = run.get("startup_s")
        rows += [
            {"target": f"{run['recipe']}: figures + checkpoints <= {AROUND_TARGET:.0%} of the fit", "value": share,
             "shown": "—" if share is None else f"{100 * share:.1f} % ({sum(v or 0 for v in around):.1f} s of {fit:.1f} s)",
             "verdict": verdict(share, AROUND_TARGET, False, " points", 100)},
            {"target": f"{run['recipe']}: start-up <= {STARTUP_TARGET_S} s (measured with the sanity check's compile)", "value": startup,
             "shown": "—" if startup is None else f"{startup:.1f} s", "verdict": verdict(startup, STARTUP_TARGET_S, False, " s")},
        ]  # fmt: skip
    return rows


def probe_targets(name: str, probes: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Framework cost, GPU busy and host waits of one probe run against their targets."""
    if probes is None:
        return [{"target": f"{name}: probes", "value": None, "shown": "—", "verdict": "not measured"}]
    lit = probes.get("lightning", {})
    ratio = probes.get("lightning_over_bare")
    graphed = probes.get("lightning_over_bare_graphed")
    busy = lit.get("gpu", {}).get("busy_fraction")
    waits = lit.get("host_waits", {})
    per_step = waits.get("waits_per_step") if waits.get("checked") else None
    return [
        {"target": f"{name}: Lightning fit >= {FRAMEWORK_TARGET:.0%} of the bare loop's images/s", "value": ratio,
         "shown": "—" if ratio is None else f"{ratio:.3f}", "verdict": verdict(ratio, FRAMEWORK_TARGET, True, " points", 100)},
        {"target": f"{name}: Lightning fit >= {GRAPHED_TARGET:.0%} of a bare graphed loop's images/s", "value": graphed,
         "shown": "—" if graphed is None else f"{graphed:.3f}", "verdict": verdict(graphed, GRAPHED_TARGET, True, " points", 100)},
        {"target": f"{name}: GPU busy >= {BUSY_TARGET:.0%} of a training window", "value": busy,
         "shown": "—" if busy is None else f"{100 * busy:.1f} %", "verdict": verdict(busy, BUSY_TARGET, True, " points", 100)},
        {"target": f"{name}: no host-device synchronisation in a training step", "value": per_step,
         "shown": "—" if per_step is None else f"{waits['waits']} in {waits['steps']} steps",
         "verdict": verdict(per_step, 0, False, " per step")},
    ]  # fmt: skip


def merge_reproduce(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One report from several calls of reproduce.py (the runs one after the other)."""
    if not reports:
        return None
    merged = {**reports[0], "runs": [run for report in reports for run in report["runs"]]}
    merged["environment"] = {**reports[0]["environment"], "command": " ; ".join(r["environment"]["command"] for r in reports)}
    merged["recipes"] = rp.summarize(merged["runs"])
    return merged


def benchmark_table(bench: dict[str, Any] | None) -> list[str]:
    if not bench or not bench.get("train"):
        return ["Not measured (the section did not finish; see gpu_check.log for any rows it printed)."]
    lines = ["| network | variant | train img/s | eval img/s | transform share | warm-up s |", "|---|---|---:|---:|---:|---:|"]
    for recipe, result in bench["train"].items():
        for variant, r in result["variants"].items():
            lines.append(f"| {recipe} | {variant} | {r['train_images_per_s']:,.0f} | {r['eval_images_per_s']:,.0f} | "
                         f"{100 * r['transform_share_of_step']:.1f} % | {r['warmup_s']:.1f} |")  # fmt: skip
        if "fit" in result:
            lines.append(f"| {recipe} | Lightning fit ({result['best']}) | {result['fit']['images_per_s']:,.0f} | | | |")
    if bench.get("interrupted"):
        lines.append("\nInterrupted at its time limit: the rows above are what it measured.")
    return lines


def probe_lines(name: str, probes: dict[str, Any] | None) -> list[str]:
    if probes is None:
        return [f"**{name}**: not measured (see gpu_check.log)."]
    lines = [f"**{name}** (`{Path(probes['config']).name} {' '.join(probes['overrides'])}`):", ""]
    lines += ["| loop | images/s | ms/step | GPU busy | device ops/step | GPU ms/step | sync calls (profiler) |", "|---|---:|---:|---:|---:|---:|---|"]
    for loop in ("lightning", "bare", "bare_graphed"):
        r = probes.get(loop, {"error": "not run"})
        if "error" in r:
            lines.append(f"| {loop} | error: {r['error']} | | | | | |")
            continue
        gpu = r.get("gpu", {})
        busy = gpu.get("busy_fraction")
        lines.append(f"| {loop} | {r.get('images_per_s', 0):,.0f} | {r.get('ms_per_step', 0):.2f} | "
                     f"{'—' if busy is None else f'{100 * busy:.1f} %'} | {gpu.get('device_events_per_step', 0):.0f} | "
                     f"{gpu.get('busy_ms_per_step', 0):.2f} | {gpu.get('sync_calls') or 'none'} |")  # fmt: skip
    waits = probes.get("lightning", {}).get("host_waits", {})
    if waits.get("where"):
        lines += ["", f"Host waits in {waits['steps']} Lightning training steps, by where they come from (innermost last):", ""]
        for where in waits["where"]:
            lines.append(f"- {where['count']}x: `{' → '.join(where['stack'][-5:])}`")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=int, default=None, help="the whole check's wall time")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a check of the script): no verdicts")
    args = parser.parse_args(argv)
    parts = [load(args.work / f"reproduce-{part}" / "reproduce.json") for part in ("seed", "modern")]
    reproduce = merge_reproduce([p for p in parts if p])
    bench = load(args.work / "benchmark.json")
    probes = {p.stem.removeprefix("probes-"): load(p) for p in sorted(args.work.glob("probes-*.json"))}
    probes.setdefault("scratch", None)  # always reported, measured or not
    targets = fit_targets(reproduce) + around_step_targets(reproduce)
    for name, result in probes.items():
        targets += probe_targets(name, result)
    if args.smoke:
        for target in targets:
            target["verdict"] = "smoke run at tiny sizes: no verdict"
    summary = {"seconds": args.seconds, "sections": sections(args.work), "targets": targets,
               "reproduce": reproduce, "benchmark": bench, "probes": probes}  # fmt: skip

    env = (reproduce or {}).get("environment", {})
    md = ["# gpu_check summary", ""]
    if env:
        md += [f"{env['device']}, {env['date']}, commit `{env['commit']}`, torch {env['versions']['torch']}, "
               f"Lightning {env['versions']['lightning']}; whole check {args.seconds} s.", ""]  # fmt: skip
    md += ["Sections: " + ", ".join(f"{s['name']} (exit {s['exit']}, {s['seconds']} s)" for s in summary["sections"]), ""]
    md += ["## Targets (issues 12 and 18, for one H100/H200)", "", "| target | measured | verdict |", "|---|---|---|"]
    md += [f"| {t['target']} | {t['shown']} | {t['verdict']} |" for t in targets]
    md += ["", "## Wall time of each recipe (reproduce.py --synthetic --seeds 1)", ""]
    md += [rp.markdown(reproduce) if reproduce else "Not measured.", ""]
    md += ["## Train-step throughput (benchmark.py --sections train)", ""] + benchmark_table(bench) + [""]
    md += ["## Framework cost, GPU busy, host waits (probes.py)", ""]
    for name, result in probes.items():
        md += probe_lines(name, result) + [""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text("\n".join(md))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if reproduce:
        rp.plot(reproduce, args.out / "reproduce.png")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
