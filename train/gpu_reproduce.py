"""Run the paper experiments at their published input sizes on one GPU box, from data shards.

Driven by train/gpu_reproduce.sh. Every experiment file except the default model's runs with its
own input size, epochs, batch size and schedule; several run at once on the one GPU (`--parallel`,
each with DataLoader workers for the augmentation), and a run still going when the budget ends is
stopped (its report is then missing and the summary says so). Experiments that start from ImageNet
weights use them when torchvision's files are in the local torch hub cache and run from random
initialisation otherwise (the summary's `init` column says which). Sun's COVID -> pneumonia
transfer runs after the COVID stage it starts from (sun_densenet121_raw_3ch).

    python -m cxr_edge.train.gpu_reproduce --data /tmp/cxr256 --out runs/gpu [--parallel 4] [--budget-s 450]
    python -m cxr_edge.train.gpu_reproduce --data DIR --out DIR --tiny     # CPU check of the same path
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

COVID_STAGE = "sun_densenet121_raw_3ch"
TINY = ["yang_logreg", "sun_loss_ce", COVID_STAGE, "sun_pneumonia_fe_covid"]


def plan(names: list[str]) -> list[tuple[str, str | None]]:
    """(experiment, prerequisite) in run order: the COVID-stage transfers wait for COVID_STAGE."""
    first = [n for n in names if n == COVID_STAGE]
    rest = [n for n in names if n != COVID_STAGE]
    dep = [n for n in rest if n.startswith("sun_pneumonia_") and n.endswith("_covid")]
    return [(n, None) for n in first] + [(n, None) for n in rest if n not in dep] + [(n, COVID_STAGE) for n in dep]


def _config(name: str, out: Path, workers: int, tiny: bool) -> tuple[Path, str]:
    from .experiment import load_experiment
    from cxr_edge.architectures import cached_imagenet_weights
    cfg = load_experiment(name)
    cfg["workers"] = 0 if tiny else workers
    init = cfg["model"].get("init", "random")
    if init == "imagenet" and not cfg["model"].get("init_path") and cached_imagenet_weights(cfg["model"]["name"]) is None:
        cfg["model"]["init"], init = "random", "random (no local ImageNet weights)"
    p = out / "configs" / f"{name}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cfg, indent=1))
    return p, init


def run(data: str, out: str, parallel: int = 4, workers: int = 3, budget_s: float = 450, tiny: bool = False,
        only: list[str] | None = None, log=print) -> dict:
    from .experiment import list_experiments
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = only or (TINY if tiny else [n for n in list_experiments() if not n.startswith("default_")])
    order = plan(names)
    t0 = time.time()
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    status: dict[str, dict] = {}
    pending = list(order)
    while pending or running:
        for name, (proc, started) in list(running.items()):
            rc = proc.poll()
            if rc is not None:
                status[name].update(rc=rc, seconds=round(time.time() - started, 1))
                del running[name]
                log(f"[{time.time() - t0:6.0f}s] {name}: exit {rc} after {status[name]['seconds']}s")
        left = budget_s - (time.time() - t0)
        if left <= 0:
            for name, (proc, started) in running.items():
                proc.terminate()
                status[name].update(rc="stopped at the budget", seconds=round(time.time() - started, 1))
            for name, _ in pending:
                status[name] = {"rc": "not started: budget spent"}
            break
        while pending and len(running) < parallel:
            name, dep = pending[0]
            if dep and dep in running:
                break   # wait for the COVID stage
            pending.pop(0)
            cfg_path, init = _config(name, out, workers, tiny)
            cmd = [sys.executable, "-m", "cxr_edge.cli", "train", str(cfg_path), "--data", data,
                   "--out", str(out / "runs" / name), "--no-resume"]
            if dep:
                ck = out / "runs" / dep / "best.safetensors"
                if not ck.is_file():
                    status[name] = {"rc": f"skipped: {dep} produced no checkpoint", "init": "checkpoint"}
                    continue
                cmd += ["--init-path", str(ck)]
                init = f"checkpoint ({dep})"
            cmd += (["--device", "cpu", "--epochs", "1", "--image-size", "64", "--limit", "32"] if tiny
                    else ["--device", "cuda"])
            (out / "runs").mkdir(parents=True, exist_ok=True)
            logf = open(out / "runs" / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), time.time())
            status[name] = {"init": init}
            log(f"[{time.time() - t0:6.0f}s] start {name} ({init})")
        time.sleep(0.5 if tiny else 2)
    summary = summarise(out, status)
    summary["wall_seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


def summarise(out: Path, status: dict) -> dict:
    rows = {}
    for name, st in status.items():
        rep = out / "runs" / name / "report.json"
        row = dict(st)
        if rep.is_file():
            r = json.loads(rep.read_text())
            pp = r["config"]["preprocess"]
            row.update(size=pp["size"], epochs=len(r.get("history") or []), n_train=r["counts"].get("train"),
                       n_test=r["counts"].get("test"), accuracy=round(100 * r["test"]["accuracy"], 2),
                       macro_f1=round(100 * r["test"]["macro"]["f1"], 2),
                       reported_accuracy=(r.get("reported") or {}).get("accuracy"),
                       train_seconds=round(r.get("train_seconds", 0), 1), device=r.get("device"))
        rows[name] = row
    return {"experiments": rows}


def summary_markdown(s: dict) -> str:
    lines = ["| experiment | init | size | epochs | train/test n | accuracy % | macro F1 % | paper accuracy % | s | status |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for name, r in s["experiments"].items():
        lines.append(f"| {name} | {r.get('init', '')} | {r.get('size', '')} | {r.get('epochs', '')} | "
                     f"{r.get('n_train', '')}/{r.get('n_test', '')} | {r.get('accuracy', '')} | {r.get('macro_f1', '')} | "
                     f"{r.get('reported_accuracy') or ''} | {r.get('seconds', '')} | {r.get('rc', '')} |")
    return "\n".join(lines) + f"\n\nwall time {s.get('wall_seconds', '')} s\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxr_edge.train.gpu_reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="manifest-layout directory (e.g. unpacked shards)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--parallel", type=int, default=4, help="experiments at once on the GPU")
    ap.add_argument("--workers", type=int, default=3, help="DataLoader workers per experiment")
    ap.add_argument("--budget-s", type=float, default=450, help="stop what still runs after this many seconds")
    ap.add_argument("--tiny", action="store_true", help="CPU check: 4 experiments, 64 px, 32 images, 1 epoch")
    ap.add_argument("--only", nargs="*", help="these experiments only")
    a = ap.parse_args(argv)
    s = run(a.data, a.out, a.parallel, a.workers, a.budget_s, a.tiny, a.only)
    print(summary_markdown(s))
    bad = [n for n, r in s["experiments"].items() if r.get("rc") not in (0,)]
    return 1 if bad and a.tiny else 0


if __name__ == "__main__":
    raise SystemExit(main())
