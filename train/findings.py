"""The findings table: the papers' comparisons this CPU can run at reduced size, >= 3 seeds each.

Each comparison is a list of arms (experiment files that differ in the one thing the paper
compares); every arm runs once per seed with the same reduced settings (input size, training
images, epochs, random initialisation: no ImageNet weights are reachable here). A seed sets the
patient-grouped split and the initialisation, and arms of one comparison share their data
configuration, so the runs of one seed see the same split: differences are paired by seed.

Reported per arm: test accuracy and macro F1, mean over seeds with a 95 % t interval
(Student's t, n - 1 degrees of freedom); per arm after the first: the paired difference to the
first arm, mean and 95 % t interval. An interval that contains 0 means this run cannot tell the
arms apart; it does not mean they are equal. Runs are resumable: a seed whose report.json
exists is not run again.

    python -m cxr_edge.train.findings --data ../shared/data/cxr --out runs/findings
        [--size 64] [--limit 800] [--epochs 6] [--seeds 0 1 2] [--parallel 2] [--only sun_loss ...]

Runs live under OUT/runs/<size>px_<limit>img_<epochs>ep/EXPERIMENT/seedS: a table only ever
combines runs made with the same settings. OVERRIDES lists what a run changes in an experiment file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Comparison:
    key: str
    title: str
    claim: str                          # what the paper reports, in its own terms
    arms: tuple[tuple[str, str], ...]   # (label, experiment name); the first is the reference arm
    testable: str                       # what a reduced-size run can and cannot say about the claim


# Changes to an experiment file for the reduced run, and why. yang_alexnet fine-tunes only the last
# quarter of AlexNet (the paper's ImageNet transfer): from random initialisation that would leave
# four of its five convolutions frozen at random weights, so every layer trains here.
OVERRIDES = {"yang_alexnet": {"phases": [{"name": "train", "epochs": 20, "trainable": "all"}]}}


COMPARISONS = (
    Comparison(
        "sun_loss", "Sun et al.: loss function (DenseNet121, 3 channels, 4 classes)",
        "CE 94.68 %, WCE(1 - CF) 95.75 %, WCE(inverse CF) 95.13 %, focal 94.51 % test accuracy "
        "(ImageNet init, 224 px, 30 epochs, 21,165 images): class weighting helps by about 1 point.",
        (("CE", "sun_loss_ce"), ("WCE(1 - CF)", "sun_densenet121_raw_3ch"),
         ("WCE(inverse CF)", "sun_loss_wce_inverse_cf"), ("focal", "sun_loss_focal")),
        "Testable in direction only: a 1-point effect needs far more test images than a reduced run "
        "has; random init at 64 px is a different regime from ImageNet init at 224 px."),
    Comparison(
        "sun_channels", "Sun et al.: pseudo-RGB (3 channels) vs 1 gray channel (DenseNet121, WCE(1 - CF))",
        "raw 3 channels 95.75 %, raw 1 channel 95.32 %: the 3-channel copy gains ~0.4 points with "
        "ImageNet weights.",
        (("3 channels", "sun_densenet121_raw_3ch"), ("1 channel", "sun_densenet121_raw_1ch")),
        "Not testable as published: the 3-channel advantage comes from reusing ImageNet's RGB "
        "filters, and from random init the two inputs carry the same information. The run checks that "
        "1 channel costs nothing from scratch."),
    Comparison(
        "yang_logreg_cnn", "Yang et al.: logistic regression vs a CNN (4 classes)",
        "logistic regression 62.24 %, AlexNet 93.86 % (ImageNet init): a CNN beats a linear model "
        "on pixels by ~30 points.",
        (("logistic regression", "yang_logreg"), ("AlexNet (all layers trained)", "yang_alexnet")),
        "Testable in direction and rough size: both arms run from random init here (AlexNet's "
        "published number used ImageNet weights, and fine-tuned only its last layers)."),
    Comparison(
        "elazhari_scratch", "El Azhari: separable-convolution CNN vs DenseNet121, both from scratch (COVID vs non-COVID)",
        "a small depthwise-separable CNN trained from scratch is competitive with large models "
        "(no number for it in the issue text).",
        (("separable CNN", "elazhari_sepconv"), ("DenseNet121", "elazhari_densenet121_scratch")),
        "Testable at reduced size from scratch; the frozen-ImageNet arms of the paper are not "
        "(no ImageNet weights here)."),
)

METRICS = (("accuracy", "test accuracy"), ("macro_f1", "macro F1"))


def settings_tag(size: int, limit: int, epochs: int) -> str:
    """The reduced settings as a folder name: runs made with other settings are never mixed in."""
    return f"{size}px_{limit}img_{epochs}ep"


def run_dir(out: Path, experiment: str, seed: int, tag: str) -> Path:
    return out / "runs" / tag / experiment / f"seed{seed}"


def experiment_file(out: Path, experiment: str) -> str:
    """The experiment as the runs use it: its name, or a copy with OVERRIDES applied under out/configs."""
    if experiment not in OVERRIDES:
        return experiment
    from .experiment import load_experiment
    cfg = {**load_experiment(experiment), **OVERRIDES[experiment]}
    path = out / "configs" / f"{experiment}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return str(path)


def _command(experiment: str, seed: int, out: Path, args) -> list[str]:
    tag = settings_tag(args.size, args.limit, args.epochs)
    return [sys.executable, "-m", "cxr_edge.cli", "train", experiment_file(out, experiment), "--data", args.data,
            "--out", str(run_dir(out, experiment, seed, tag)), "--seed", str(seed), "--image-size", str(args.size),
            "--limit", str(args.limit), "--epochs", str(args.epochs), "--init", "random"]


def planned(comparisons, seeds) -> list[tuple[str, int]]:
    """(experiment, seed) once each, in comparison order (arms shared by comparisons run once)."""
    seen: list[tuple[str, int]] = []
    for c in comparisons:
        for _, exp in c.arms:
            for s in seeds:
                if (exp, s) not in seen:
                    seen.append((exp, s))
    return seen


def run_all(args, comparisons, log=print) -> int:
    """Train every (arm, seed) without a report yet; returns the number of runs that failed."""
    out = Path(args.out)
    tag = settings_tag(args.size, args.limit, args.epochs)
    todo = [(e, s) for e, s in planned(comparisons, args.seeds)
            if not (run_dir(out, e, s, tag) / "report.json").exists()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    failed = 0
    t0 = time.time()
    while todo or running:
        while todo and len(running) < args.parallel:
            exp, seed = todo.pop(0)
            d = run_dir(out, exp, seed, tag)
            d.mkdir(parents=True, exist_ok=True)
            cmd = _command(exp, seed, out, args)
            with open(d.parent / f"seed{seed}.log", "w") as logf:
                running.append((subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), exp, seed, time.time()))
        time.sleep(2)
        for item in list(running):
            proc, exp, seed, started = item
            if proc.poll() is not None:
                running.remove(item)
                failed += proc.returncode != 0
                log(f"[{time.time() - t0:6.0f}s] {exp} seed {seed}: exit {proc.returncode} after {time.time() - started:.0f}s")
    return failed


def _score(report: dict) -> dict:
    t = report["test"]
    support = [int(v["support"]) for v in t.get("per_class", {}).values()]
    return {"accuracy": float(t["accuracy"]), "macro_f1": float(t["macro"]["f1"]), "n": int(t["n"]),
            # what always answering the largest test class scores: the floor a model must beat
            "majority": max(support) / sum(support) if support else float("nan")}


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): 95 % Student-t interval of the mean (nan bounds for fewer than 2 values)."""
    from scipy import stats
    v = np.asarray(values, np.float64)
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - half, m + half


def summarise(out: Path, comparisons, seeds, tag: str) -> dict:
    """Every comparison's per-arm scores and paired differences from the reports of runs made with
    the settings `tag` (settings_tag)."""
    result = {}
    for c in comparisons:
        scores = {}
        for label, exp in c.arms:
            per_seed = {}
            for s in seeds:
                p = run_dir(out, exp, s, tag) / "report.json"
                if p.exists():
                    per_seed[s] = _score(json.loads(p.read_text()))
            scores[label] = per_seed
        arms = []
        ref_label = c.arms[0][0]
        for label, exp in c.arms:
            row = {"arm": label, "experiment": exp, "seeds": sorted(scores[label]),
                   "n_test": sorted({v["n"] for v in scores[label].values()}),
                   "majority": float(np.mean([v["majority"] for v in scores[label].values()])) if scores[label] else None}
            for key, _ in METRICS:
                vals = [scores[label][s][key] for s in sorted(scores[label])]
                row[key] = {"values": vals, "mean_ci": t_interval(vals) if vals else None}
                common = sorted(set(scores[label]) & set(scores[ref_label]))
                if label != ref_label and common:
                    diffs = [scores[label][s][key] - scores[ref_label][s][key] for s in common]
                    row[key]["diff_ci"] = t_interval(diffs)
            arms.append(row)
        result[c.key] = {"title": c.title, "claim": c.claim, "testable": c.testable, "arms": arms}
    return result


def _pct_ci(ci, lo_limit: float = 0.0) -> str:
    """mean [low, high] in percent; the interval is clipped to the metric's range (lo_limit..1),
    which a t interval over 3 values can overshoot."""
    if ci is None:
        return "–"
    m, lo, hi = ci
    if np.isnan(lo):
        return f"{100 * m:.1f}"
    return f"{100 * m:.1f} [{100 * max(lo, lo_limit):.1f}, {100 * min(hi, 1.0):.1f}]"


def markdown(summary: dict, settings: str) -> str:
    lines = [(f"Settings: {settings}. Mean over seeds with a 95 % t interval (clipped to the metric's range); Δ is "
              "the paired difference to the first arm of the comparison (same seed, same split), in points; "
              "majority: the accuracy of always answering the largest test class."), ""]
    for s in summary.values():
        lines += [f"**{s['title']}**", "", f"Published: {s['claim']}", "",
                  "| arm | experiment | seeds | test n | majority % | accuracy % | Δ accuracy | macro F1 % | Δ macro F1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for a in s["arms"]:
            majority = "–" if a["majority"] is None else f"{100 * a['majority']:.1f}"
            lines.append(f"| {a['arm']} | `{a['experiment']}` | {len(a['seeds'])} | {'/'.join(map(str, a['n_test'])) or '–'} | "
                         f"{majority} | {_pct_ci(a['accuracy']['mean_ci'])} | {_pct_ci(a['accuracy'].get('diff_ci'), -1.0)} | "
                         f"{_pct_ci(a['macro_f1']['mean_ci'])} | {_pct_ci(a['macro_f1'].get('diff_ci'), -1.0)} |")
        lines += ["", f"What this can test: {s['testable']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cxr_edge.train.findings", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cxr", help="labelled X-rays (default: ../shared/data/cxr)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64, help="input size in px (default 64)")
    p.add_argument("--limit", type=int, default=800, help="training images per run (val/test get limit/4)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--only", nargs="*", help="comparison keys (default: all)")
    p.add_argument("--summary-only", action="store_true", help="do not train; summarise the reports found")
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("an interval needs at least 2 seeds (3 or more recommended)")
    comparisons = [c for c in COMPARISONS if not args.only or c.key in args.only]
    if not comparisons:
        p.error(f"--only: unknown keys; choose from {', '.join(c.key for c in COMPARISONS)}")
    out = Path(args.out)
    failed = 0
    if not args.summary_only:
        if not Path(args.data).is_dir():
            p.error(f"--data {args.data}: no such folder (the team's runs use ../shared/data/cxr)")
        failed = run_all(args, comparisons)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(out, comparisons, args.seeds, settings_tag(args.size, args.limit, args.epochs))
    settings = (f"{args.size} px, random init, {args.limit} training images (val/test {args.limit // 4}), "
                f"{args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}")
    (out / "findings.json").write_text(json.dumps({"settings": settings, "comparisons": summary}, indent=1))
    (out / "findings.md").write_text(markdown(summary, settings))
    print(markdown(summary, settings))
    if failed:
        print(f"{failed} run(s) failed: see the seedN.log files under {out / 'runs'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
