"""Model card: the training run's test metrics (overall and per data source), the data it saw,
the parity of every artifact, and plain limitations. Stored in model.json's provenance and
rendered as MODEL_CARD.md (+ confusion_matrix.png) inside the package."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

LIMITATIONS = [
    "Not a medical device and not for diagnostic use.",
    "Public collections confound label with source: covid images come only from adult case collections "
    "(many taken from papers and websites, some with arrows or annotations), normal and pneumonia images "
    "mostly from the pediatric Kermany set and adult NIH images. A high score may reflect such shortcuts "
    "(age, image style, source) rather than lung findings; the per-source table below is the place to look.",
    "1,307 Kermany images are 224x224 squashed copies; preprocessing stretches every image to a square, "
    "so the aspect ratio cannot single them out, but their resolution and style still can.",
    "Trained from random initialisation on ~2,000 images at low resolution on a CPU; no external validation "
    "set, no prospective evaluation, no calibration of probabilities.",
    "NIH labels are NLP-mined from reports (stated accuracy > 90 %).",
    "Several sources are licensed for research or non-commercial use only (CC BY-NC-*); check before any other use.",
]


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def build_card(report_path, split_path, data_readme: str | None, command: str) -> dict:
    report = json.loads(Path(report_path).read_text())
    split = json.loads(Path(split_path).read_text())
    counts = {part: {"by_class": dict(Counter(s["label"] for s in v)),
                     "by_source": dict(Counter(s["source"] for s in v))} for part, v in split.items()}
    per_source_class = {}
    for part, v in split.items():
        for s in v:
            per_source_class.setdefault(s["source"], Counter())[s["label"]] += 1
    t = report["test"]
    return {
        "disclaimer": LIMITATIONS[0],
        "training_command": command,
        "experiment": report.get("experiment"),
        "hardware": report.get("device"),
        "train_minutes": round(report.get("train_seconds", 0) / 60, 1),
        "best_epoch": report.get("best_epoch"),
        "data": {"description": data_readme, "counts": counts,
                 "per_source_class_all_parts": {k: dict(v) for k, v in per_source_class.items()},
                 "split": "by linked patient group, stratified by (label, source), seeded hash; "
                          "lateral views excluded; the repository's sample images forced into test"},
        "test_metrics": t,
        "test_metrics_by_source": report.get("test_by_source"),
        "limitations": LIMITATIONS[1:],
    }


def render(pkg, card: dict) -> str:
    t = card["test_metrics"]
    L = [f"# Model card: {pkg.name}", "", f"**{card['disclaimer']}**", "",
         f"Classes: {', '.join(pkg.classes)} (normal class: {pkg.normal_class}). Input: {pkg.preprocess.channels} x "
         f"{pkg.preprocess.size} x {pkg.preprocess.size}, resize '{pkg.preprocess.resize}', mean {list(pkg.preprocess.mean)}, "
         f"std {list(pkg.preprocess.std)}. Architecture: {pkg.architecture.get('name')} with head '{pkg.architecture.get('head')}', "
         "random initialisation.", "",
         f"Trained with: `{card['training_command']}` — {card['train_minutes']} min on {card['hardware']}, "
         f"best validation epoch {card['best_epoch']}.", "", "## Data", "",
         "Real chest X-rays from `../shared/data/cxr` (seven public collections; sources and licences in its README and "
         "manifest). " + card["data"]["split"] + ".", "",
         "| part | " + " | ".join(pkg.classes) + " | total |", "|---|" + "---:|" * (len(pkg.classes) + 1)]
    for part, c in card["data"]["counts"].items():
        L.append(f"| {part} | " + " | ".join(str(c["by_class"].get(k, 0)) for k in pkg.classes) + f" | {sum(c['by_class'].values())} |")
    L += ["", "Per source (all parts):", "", "| source | " + " | ".join(pkg.classes) + " |", "|---|" + "---:|" * len(pkg.classes)]
    for src, c in sorted(card["data"]["per_source_class_all_parts"].items()):
        L.append(f"| {src} | " + " | ".join(str(c.get(k, 0)) for k in pkg.classes) + " |")
    L += ["", "## Test split (torch fp32 reference)", "",
          f"Accuracy {_pct(t['accuracy'])} %, macro F1 {_pct(t['macro']['f1'])} %, weighted F1 {_pct(t['weighted']['f1'])} %, "
          f"macro ROC-AUC {t['roc_auc_macro']:.3f}" if t.get("roc_auc_macro") is not None else "", "",
          "| class | precision % | recall % | F1 % | specificity % | ROC-AUC | n |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c, v in t["per_class"].items():
        auc = "n/a" if v["roc_auc"] is None else f"{v['roc_auc']:.3f}"
        L.append(f"| {c} | {_pct(v['precision'])} | {_pct(v['recall'])} | {_pct(v['f1'])} | {_pct(v['specificity'])} | {auc} | {v['support']} |")
    if "disease_called_normal" in t:
        L += ["", "Disease called normal: " + ", ".join(f"{k} {v}" for k, v in t["disease_called_normal"].items()) + "."]
    L += ["", "Confusion matrix (rows truth, columns prediction) — `confusion_matrix.png`:", "", "| | " + " | ".join(t["classes"]) + " |",
          "|---|" + "---:|" * len(t["classes"])]
    for c, row in zip(t["classes"], t["confusion_matrix"]):
        L.append(f"| **{c}** | " + " | ".join(str(v) for v in row) + " |")
    L += ["", "## Test split by data source", "", "| source | n | accuracy % | macro F1 % | per-class recall % | disease called normal |",
          "|---|---:|---:|---:|---|---|"]
    for src, r in (card.get("test_metrics_by_source") or {}).items():
        rec = ", ".join(f"{c} {_pct(v['recall'])}" for c, v in r["per_class"].items() if v["support"])
        dcn = ", ".join(f"{k} {v}" for k, v in r.get("disease_called_normal", {}).items() if v) or "-"
        L.append(f"| {src} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['macro']['f1'])} | {rec} | {dcn} |")
    L += ["", "## Artifacts and parity with the torch fp32 reference (test split)", "",
          "| artifact | MB | backend/precision | agreement % | max abs dp | mean abs dp | accuracy delta pp | gate |", "|---|---:|---|---:|---:|---:|---:|---|"]
    for a in pkg.artifacts:
        for key, g in a.gate.items():
            p = a.parity.get(key)
            if p is None:
                L.append(f"| {a.file} | {a.bytes / 1e6:.1f} | {key} | | | | | not measured: {g.get('skipped', '')} |")
                continue
            dacc = f"{100 * p['accuracy_delta']:+.2f}" if "accuracy_delta" in p else "-"
            L.append(f"| {a.file} | {a.bytes / 1e6:.1f} | {key} | {100 * p['top1_agreement']:.2f} | {p['max_abs_dp']:.2e} | "
                     f"{p['mean_abs_dp']:.2e} | {dacc} | {'pass' if g['passed'] else 'FAIL ' + '; '.join(g['failures'])} |")
    L += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    return "\n".join(L) + "\n"


def attach_card(pkg, report_path, split_path, command: str, data_readme: str | None = None) -> None:
    card = build_card(report_path, split_path, data_readme, command)
    pkg.provenance["model_card"] = card
    cm = Path(report_path).parent / "confusion_matrix.png"
    if cm.is_file():
        shutil.copy(cm, pkg.root / "confusion_matrix.png")
    (pkg.root / "MODEL_CARD.md").write_text(render(pkg, card))
    pkg.write()
