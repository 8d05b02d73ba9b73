"""Classification metrics shared by train/ and bench/ (numpy only, so bench needs no torch)."""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm  # rows: truth, columns: prediction


def _safe_div(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def roc_auc_binary(y: np.ndarray, score: np.ndarray) -> float | None:
    """Mann-Whitney AUC with average ranks for ties; None when only one class is present."""
    y = np.asarray(y, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_report(y_true, probs, classes: list, normal_class: str | None = None) -> dict:
    """Accuracy, per-class P/R/F1 and specificity, macro/weighted/micro, confusion matrix,
    one-vs-rest ROC-AUC, and counts of disease called normal."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, int)
    k = len(classes)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    n = cm.sum()
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    tn = n - support - predicted + tp
    specificity = _safe_div(tn, tn + predicted - tp)
    w = _safe_div(support, np.full(k, support.sum()))
    per_class = {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "specificity": float(specificity[i]), "support": int(support[i]),
                     "roc_auc": roc_auc_binary(y_true == i, probs[:, i]) if len(probs) else None}
                 for i, c in enumerate(classes)}
    aucs = [v["roc_auc"] for v in per_class.values() if v["roc_auc"] is not None]
    out = {
        "n": int(n),
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "per_class": per_class,
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "weighted": {"precision": float((precision * w).sum()), "recall": float((recall * w).sum()),
                     "f1": float((f1 * w).sum())},
        # micro P = R = F1 = accuracy for single-label multi-class
        "micro": {"precision": float(tp.sum() / n) if n else 0.0, "recall": float(tp.sum() / n) if n else 0.0,
                  "f1": float(tp.sum() / n) if n else 0.0},
        "roc_auc_macro": float(np.mean(aucs)) if aucs else None,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }
    if k == 2:
        pos = 1 if normal_class is None or classes[1] != normal_class else 0
        out["sensitivity"] = per_class[classes[pos]]["recall"]
        out["specificity"] = per_class[classes[pos]]["specificity"]
    if normal_class in classes:
        ni = classes.index(normal_class)
        out["disease_called_normal"] = {c: int(cm[i, ni]) for i, c in enumerate(classes) if i != ni}
    return out
