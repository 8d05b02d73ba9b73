"""Classification metrics for train/ and the model card, computed with scikit-learn.

`classification_report` returns one JSON-ready dict: accuracy, per-class precision / recall /
F1 / specificity / support / one-vs-rest ROC-AUC, macro / weighted / micro averages, the confusion
matrix (rows: truth, columns: prediction) and, when a normal class is named, how many images of
each disease class were called normal (the error a screening model must not make).
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def roc_auc_binary(y, score) -> float | None:
    """Area under the ROC curve for a binary truth (bool (N,)) and a score (N,); None when only
    one class is present (the AUC is undefined)."""
    y = np.asarray(y, bool)
    if y.all() or not y.any():
        return None
    return float(skm.roc_auc_score(y, np.asarray(score, np.float64)))


def classification_report(y_true, probs, classes: list, normal_class: str | None = None) -> dict:
    """Metrics of (N,) integer labels against (N, K) probabilities (prediction = argmax).

    Args:
        y_true: (N,) int class indices into `classes`.
        probs: (N, K) float probabilities (rows need not sum to 1 exactly).
        classes: the K class names, in column order.
        normal_class: the "no disease" class, for `disease_called_normal` and binary sensitivity.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, int)
    k = len(classes)
    labels = list(range(k))
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels) if len(y_true) else np.zeros((k, k), np.int64)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0) if len(y_true) else (np.zeros(k),) * 3 + (np.zeros(k, int),)
    n = int(cm.sum())
    predicted, tp = cm.sum(0), np.diag(cm)
    tn = n - cm.sum(1) - predicted + tp
    fp = predicted - tp
    specificity = np.divide(tn, tn + fp, out=np.zeros(k), where=(tn + fp) > 0)
    per_class = {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "specificity": float(specificity[i]), "support": int(support[i]),
                     "roc_auc": roc_auc_binary(y_true == i, probs[:, i]) if len(probs) else None}
                 for i, c in enumerate(classes)}
    aucs = [v["roc_auc"] for v in per_class.values() if v["roc_auc"] is not None]

    def averaged(avg):
        if not n:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        return {"precision": float(p), "recall": float(r), "f1": float(f)}

    out = {
        "n": n,
        "accuracy": float(skm.accuracy_score(y_true, y_pred)) if n else 0.0,
        "per_class": per_class,
        "macro": averaged("macro"),
        "weighted": averaged("weighted"),
        "micro": averaged("micro"),
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
