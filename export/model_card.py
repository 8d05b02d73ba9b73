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
    ps = (pkg.provenance.get("export") or {}).get("parity_set") or {}
    where = f"{ps.get('source', 'parity set')}, {ps.get('images', '?')} images" + (
        " — " + ", ".join(f"{k} {v}" for k, v in ps["by_source"].items()) if ps.get("by_source") else "")
    L += ["", f"## Artifacts and parity with the torch fp32 reference ({where})", "",
          "Agreement: top-1 equal to torch fp32; LB95: its Wilson 95 % lower confidence bound, on which the gate "
          "decides. Uncertain: results whose top-2 margin is below 2 x this combination's p99 |Δp| (these are "
          "flagged `uncertain` at run time; \"missed\" counts label flips the flag did not cover).", "",
          "| artifact | MB | backend/precision | n | agreement % | LB95 % | max abs dp | p99 abs dp | accuracy delta pp | "
          "uncertain (missed) | gate |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in pkg.artifacts:
        for key, g in a.gate.items():
            p = a.parity.get(key)
            if p is None:
                L.append(f"| {a.file} | {a.bytes / 1e6:.1f} | {key} | | | | | | | | not measured: {g.get('skipped', '')} |")
                continue
            dacc = f"{100 * p['accuracy_delta']:+.2f}" if "accuracy_delta" in p else "-"
            lb = f"{100 * p['lower_bound']:.2f}" if "lower_bound" in p else "-"
            unc = f"{p['uncertain']} ({p.get('flips_not_uncertain', 0)})" if "uncertain" in p else "-"
            L.append(f"| {a.file} | {a.bytes / 1e6:.1f} | {key} | {p['n']} | {100 * p['top1_agreement']:.2f} | {lb} | "
                     f"{p['max_abs_dp']:.2e} | {p.get('p99_abs_dp', p['max_abs_dp']):.2e} | {dacc} | {unc} | "
                     f"{'pass' if g['passed'] else 'FAIL ' + '; '.join(g.get('failures', []))} |")
    int8 = next((a for a in pkg.artifacts if a.precision == "int8"), None)
    if int8 is not None:
        ex = int8.extra or {}
        L += ["", "INT8 (`" + int8.file + "`): " + "; ".join(f"{k}: {v}" for k, v in ex.items()
                                                         if k not in ("variants_tried",)) + "."]
        bysrc = next((p["by_source"] for k, p in int8.parity.items() if "by_source" in p), None)
        if bysrc:
            L += ["", "INT8 agreement per data source: " + ", ".join(
                f"{k} {v['n'] - v['disagreements']}/{v['n']}" for k, v in bysrc.items()) + "."]
        tried = ex.get("variants_tried")
        if tried:
            L += ["", "INT8 variants measured (OpenVINO int8 vs torch fp32):", "",
                  "| variant | n | agreement % | LB95 % | max abs dp | p99 abs dp | uncertain (missed) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
            for v in tried:
                L.append(f"| {v['variant']} | {v['n']} | {100 * v['agreement']:.2f} | {100 * v['lower_bound']:.2f} | "
                         f"{v['max_abs_dp']:.3f} | {v['p99_abs_dp']:.3f} | {v['uncertain']} ({v['flips_not_uncertain']}) |")
    rs = getattr(pkg, "reference_set", None) or {}
    if rs:
        L += ["", f"Reference set (`{rs['file']}`, {rs['shape'][0]} images of {rs['shape'][1]} x {rs['shape'][2]}, "
              f"torch fp32 logits in model.json for on-device verification): {rs.get('source', '')}."]
    try:    # issue 17: calibration, operating points, input guard (train/calibrate.py; workbench only)
        from cxr_edge.train.calibrate import card_lines
        L += card_lines(pkg)
    except ImportError:
        pass
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
