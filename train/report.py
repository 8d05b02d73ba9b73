"""Experiment reports: report.json, a Markdown table laid out like the papers', and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}"


COUNT_KEYS = ("epochs", "best_epoch", "n")  # reported as plain numbers, not percentages


def flat_metrics(report: dict) -> dict:
    """Reproduced numbers under the keys an experiment's "reported" block uses: accuracy,
    {macro,weighted,micro}_{precision,recall,f1}, sensitivity, specificity, roc_auc_macro,
    <class>_{precision,recall,f1,specificity}, disease_called_normal_<class>, epochs (trained),
    best_epoch, and <phase>_<any of these> for multi-phase runs (e.g. fe_accuracy). Rates in %."""
    def one(t: dict, prefix: str = "") -> dict:
        out = {prefix + "accuracy": 100 * t["accuracy"]}
        for avg in ("macro", "weighted", "micro"):
            for m in ("precision", "recall", "f1"):
                out[f"{prefix}{avg}_{m}"] = 100 * t[avg][m]
        for k in ("sensitivity", "specificity"):
            if k in t:
                out[prefix + k] = 100 * t[k]
        if t.get("roc_auc_macro") is not None:
            out[prefix + "roc_auc_macro"] = t["roc_auc_macro"]
        for c, v in t["per_class"].items():
            for m in ("precision", "recall", "f1", "specificity"):
                out[f"{prefix}{c}_{m}"] = 100 * v[m]
        for c, v in (t.get("disease_called_normal") or {}).items():
            out[f"{prefix}disease_called_normal_{c}"] = v
        return out
    out = one(report["test"])
    out["epochs"] = len(report.get("history") or [])
    out["best_epoch"] = report.get("best_epoch")
    for ph, t in (report.get("test_by_phase") or {}).items():
        out.update(one(t, f"{ph}_"))
    return out


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if key in COUNT_KEYS or key.split("_", 1)[-1].startswith("disease_called_normal") or key.startswith("disease_called_normal"):
        return f"{v:g}"
    if key.endswith("roc_auc_macro"):
        return f"{v:.4f}"
    return f"{v:.2f}"


def reported_vs_reproduced(report: dict) -> list[tuple[str, str, str]]:
    """(metric, reproduced, reported) rows: the paper's numbers first, in the file's order, then
    the standard ones it did not report."""
    flat = flat_metrics(report)
    rep = {k: v for k, v in (report.get("reported") or {}).items() if not isinstance(v, (dict, list)) and k != "note"}
    rows = [(k, _fmt(k, flat.get(k)), _fmt(k, v)) for k, v in rep.items()]
    standard = ["accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall",
                "weighted_f1", "micro_f1", "sensitivity", "specificity", "roc_auc_macro", "epochs", "best_epoch"]
    rows += [(k, _fmt(k, flat[k]), "-") for k in standard if k in flat and k not in rep]
    return rows


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    if "reproduced" not in report:
        report = dict(report, reproduced=flat_metrics(report))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    t = report["test"]
    lines = [f"# {report['experiment']}", "", f"Paper: {report.get('paper') or '-'}", "",
             f"Split: " + ", ".join(f"{k} {v}" for k, v in report["counts"].items()) +
             f"; trained {report['train_seconds'] / 60:.1f} min on {report['device']}; best epoch {report.get('best_epoch')}", ""]
    if report.get("val_is_test"):
        lines += ["Note: train/test split without a validation part: the test set also chose the best epoch "
                  "(as the paper's code did), so the test numbers are optimistic.", ""]
    note = (report.get("reported") or {}).get("note")
    if note:
        lines += [f"Reported numbers: {note}", ""]
    lines += ["Percentages except ROC-AUC and counts.", "", "| metric | reproduced | reported |", "|---|---:|---:|"]
    lines += [f"| {k} | {a} | {b} |" for k, a, b in reported_vs_reproduced(report)]
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
    if report.get("test_by_phase"):
        lines += ["", "Test set at the end of each phase:", "", "| phase | accuracy % | macro F1 % |", "|---|---:|---:|"]
        for ph, r in report["test_by_phase"].items():
            lines.append(f"| {ph} | {_pct(r['accuracy'])} | {_pct(r['macro']['f1'])} |")
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


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0,0) to (1,1)."""
    from sklearn.metrics import roc_curve as sk_roc_curve
    fpr, tpr, _ = sk_roc_curve(np.asarray(y, bool), np.asarray(score, float), drop_intermediate=False)
    return fpr, tpr


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
    pred = report.get("test_predictions")
    if pred and pred.get("labels"):
        y, probs = np.asarray(pred["labels"]), np.asarray(pred["probs"])
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for i, c in enumerate(t["classes"]):
            if 0 < (y == i).sum() < len(y):
                fpr, tpr = roc_curve(y == i, probs[:, i])
                auc = t["per_class"][c]["roc_auc"]
                ax.plot(fpr, tpr, label=f"{c} (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one vs rest (test)")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "roc.png", dpi=100)
        plt.close(fig)
