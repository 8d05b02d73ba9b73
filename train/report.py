"""Experiment reports: report.json, a Markdown table laid out like the papers', and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}"


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    t = report["test"]
    lines = [f"# {report['experiment']}", "", f"Paper: {report.get('paper') or '-'}", "",
             f"Split: " + ", ".join(f"{k} {v}" for k, v in report["counts"].items()) +
             f"; trained {report['train_seconds'] / 60:.1f} min on {report['device']}; best epoch {report.get('best_epoch')}", "",
             "| metric | reproduced | reported |", "|---|---:|---:|"]
    rep = report.get("reported") or {}
    lines.append(f"| accuracy % | {_pct(t['accuracy'])} | {rep.get('accuracy', '-')} |")
    for avg in ("macro", "weighted"):
        for m in ("precision", "recall", "f1"):
            lines.append(f"| {avg} {m} % | {_pct(t[avg][m])} | {rep.get(f'{avg}_{m}', '-')} |")
    if "sensitivity" in t:
        lines.append(f"| sensitivity % | {_pct(t['sensitivity'])} | {rep.get('sensitivity', '-')} |")
        lines.append(f"| specificity % | {_pct(t['specificity'])} | {rep.get('specificity', '-')} |")
    lines.append(f"| ROC-AUC (macro, one-vs-rest) | {t['roc_auc_macro'] and round(t['roc_auc_macro'], 4)} | - |")
    lines += ["", "Per class:", "", "| class | precision | recall | F1 | specificity | AUC | n |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c, v in t["per_class"].items():
        auc = "n/a" if v["roc_auc"] is None else f"{v['roc_auc']:.3f}"
        lines.append(f"| {c} | {_pct(v['precision'])} | {_pct(v['recall'])} | {_pct(v['f1'])} | "
                     f"{_pct(v['specificity'])} | {auc} | {v['support']} |")
    if "disease_called_normal" in t:
        lines += ["", "Disease called normal: " + ", ".join(f"{k} {v}" for k, v in t["disease_called_normal"].items())]
    lines += ["", "Confusion matrix (rows truth, columns prediction): " + ", ".join(t["classes"]), ""]
    for c, row in zip(t["classes"], t["confusion_matrix"]):
        lines.append(f"    {c:>12} " + " ".join(f"{v:5d}" for v in row))
    if report.get("test_by_source"):
        lines += ["", "By data source:", "", "| source | n | accuracy % | macro F1 % | disease called normal |", "|---|---:|---:|---:|---|"]
        for src, r in report["test_by_source"].items():
            dcn = r.get("disease_called_normal", {})
            lines.append(f"| {src} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['macro']['f1'])} | "
                         + (", ".join(f"{k} {v}" for k, v in dcn.items()) or "-") + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    try:
        plot(report, out)
    except ImportError:
        pass


def plot(report: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h = report["history"]
    if h:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ep = [r["epoch"] for r in h]
        ax[0].plot(ep, [r["train_loss"] for r in h], label="train")
        ax[0].plot(ep, [r["val_loss"] for r in h], label="val")
        ax[0].set(title="loss", xlabel="epoch")
        ax[1].plot(ep, [r["train_acc"] for r in h], label="train")
        ax[1].plot(ep, [r["val_acc"] for r in h], label="val")
        ax[1].set(title="accuracy", xlabel="epoch")
        for a in ax:
            a.legend()
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
        plt.close(fig)
    t = report["test"]
    cm = np.array(t["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(len(t["classes"])), yticks=range(len(t["classes"])), xticklabels=t["classes"],
           yticklabels=t["classes"], xlabel="predicted", ylabel="true", title=f"{report['experiment']} (test)")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)
