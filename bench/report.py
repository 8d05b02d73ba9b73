"""report.json (the record), report.md (the table a CI job posts) and throughput.png (the chart)."""
from __future__ import annotations

import json
from pathlib import Path

from cxr_edge.parity import TOO_FEW


def _f(v, fmt="{:.1f}", none="–"):
    return none if v is None else fmt.format(v)


def _pct(v, digits=1):
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _x(v):
    return "–" if v is None else f"{v:.2f}×"


def _uncertain_cell(par: dict) -> str:
    """"u (f missed)": results flagged uncertain by the near-tie rule, and label flips it missed."""
    if "uncertain" not in par:
        return "–"
    return f"{par['uncertain']}" + (f" ({par['flips_not_uncertain']} flips unflagged)" if par.get("flips_not_uncertain") else "")


def _by_source_cell(par: dict) -> str:
    """Per-source top-1 agreement, e.g. "nih 123/124, cohen 56/56"."""
    bs = par.get("by_source") or {}
    return ", ".join(f"{k} {v['n'] - v['disagreements']}/{v['n']}" for k, v in bs.items()) or "–"


def _too_few(g: dict | None) -> bool:
    """The bench set was too small for any verdict (not a parity failure)."""
    return bool(g) and not g.get("passed") and bool(g.get("failures")) \
        and all(f.startswith(TOO_FEW) for f in g["failures"])


def _gate_cell(c):
    g = c["results"].get("gate_bench")
    bench = "" if not g else (" / bench PASS" if g["passed"] else
                              " / bench: too few images" if _too_few(g) else " / bench FAIL")
    recorded = c["gate"]
    short = recorded if len(recorded) <= 22 else recorded[:20] + "…"
    return short + bench


def markdown(report: dict) -> str:
    """report.md: the report dict as markdown, one section per function below, in this order."""
    sections = (_header, _targets, _combinations, _latency, _parity_detail, _not_measured,
                _reference_pipeline, _soak)
    lines = [line for section in sections for line in section(report)]
    return "\n".join(lines + ["Research software, not a medical device: not for diagnostic use.", ""])


def _busy_warning(h: dict) -> list[str]:
    """A warning line when the load average exceeded the usable cores at the start or end."""
    cpu = h["cpu"]
    start, end = h.get("loadavg_start"), h.get("loadavg_end")
    if not (start and end) or max(start[0], end[0]) <= (cpu["usable_cores"] or cpu["logical_cores"] or 1):
        return []
    return [f"- ⚠ the machine was busy (load average {max(start[0], end[0]):.1f} on "
            f"{cpu['usable_cores'] or cpu['logical_cores']} cores): speeds are not representative; compare rows "
            "with their own load column below"]


def _header(report: dict) -> list[str]:
    """Title, host, load, versions, data and memory mode."""
    h, st = report["host"], report["settings"]
    cpu, v = h["cpu"], h["versions"]
    gpu = h["gpu"] if isinstance(h["gpu"], str) else ", ".join(g["name"] for g in h["gpu"])
    return [f"# cxr-edge bench: {report['package']['name']}", "",
            f"- host: {cpu['model']}, {cpu['logical_cores']} logical / {cpu['physical_cores'] or '?'} physical cores "
            f"(usable {cpu['usable_cores']}), ISA {', '.join(cpu['flags']) or '–'}; GPU: {gpu}",
            f"- load average at start {_f((h.get('loadavg_start') or [None])[0], '{:.2f}')}, end "
            f"{_f((h.get('loadavg_end') or [None])[0], '{:.2f}')}; nice {h.get('nice')}",
            *_busy_warning(h),
            "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("cxr-edge", "openvino", "onnxruntime", "torch",
                                                             "torchvision", "numpy", "pillow") if v.get(k)),
            f"- data: {report['data']['images']} images ({report['data']['labelled']} labelled) from "
            f"`{report['data']['path']}`; threads {st['threads'] or 'backend default'}, decode workers "
            f"{h['threads']['decode_workers']}; end-to-end batch size {st['e2e_batch_size']}, "
            f"{st['e2e_images']} images per e2e run",
            f"- memory: {st['rss_mode']}", ""]


def _targets(report: dict) -> list[str]:
    """The three targets of the summary, each with its measured value and ✅ / ❌."""
    s, ebs = report["summary"], report["settings"]["e2e_batch_size"]
    L = ["## Targets (this run, side by side)", ""]
    if s.get("auto"):
        met = s.get("met", {})
        mark = lambda k: "" if k not in met else (" ✅" if met[k] else " ❌")
        L += [f"- `classify` auto = **{s['auto']}**"]
        if "auto_vs_reference" in s:
            L += [f"- end-to-end vs torchvision+torch-eager reference pipeline: {_f(s.get('auto_e2e_ips'))} vs "
                  f"{_f(s.get('reference_ips'))} img/s = **{_x(s['auto_vs_reference'])}** (target ≥ 6×){mark('e2e_vs_reference')}; "
                  f"top-1 agreement with it {_pct(s.get('auto_vs_reference_top1_agreement'))}"
                  + (f", accuracy {_pct(s.get('auto_e2e_accuracy'))} vs {_pct(s.get('reference_pipeline_accuracy'))}"
                     if "auto_e2e_accuracy" in s else "")]
        L += [f"- end-to-end / inference-only at batch {ebs}: **{_pct(s.get('auto_e2e_vs_infer'), 0)}** (target ≥ 85 %){mark('e2e_vs_infer')}",
              f"- warm single-image latency with decode / inference-only batch-1 p50: **{_x(s.get('auto_predict_one_vs_infer_b1'))}** "
              f"(target ≤ 1.3×){mark('predict_one_vs_infer_b1')}"]
    if s.get("note"):
        L += [f"- {s['note']}"]
    return L + [""]


def _combination_row(c: dict, bss: list[str], width: int) -> str | None:
    """One row of the combinations table (None for an unavailable combination)."""
    if c["status"] == "unavailable":
        return None
    name = (f"**{c['key']}**" if c["auto"] else c["key"]) + (" (ref)" if c["reference"] else "") \
        + (" (auto)" if c["auto"] else "")
    if c["status"] != "ok":
        return "| " + " | ".join([name, _gate_cell(c), "ERROR", _f(c["artifact_mb"])] + [""] * (width - 4)) + " |"
    r = c["results"]
    inf, e, p1, par = r.get("infer", {}), r.get("e2e", {}), r.get("predict_one", {}), r.get("parity") or {}
    cells = [name, _gate_cell(c), "ok" + (" (forced)" if c["forced"] else ""), _f(c["artifact_mb"]),
             f"{_f(r.get('load_cold_s'), '{:.2f}')} / {_f(r.get('load_warm_s'), '{:.2f}')}"]
    cells += ["–" if not inf.get(b) else f"{inf[b]['ips']:.1f} ({_x(inf[b].get('speedup_vs_torch'))})" for b in bss]
    rss = r.get("peak_rss_mb", r.get("peak_rss_sampled_mb"))
    cells += [_f(e.get("ips")), _pct(e.get("vs_infer"), 0),
              f"{_f(p1.get('p50_ms'))} ({_x(p1.get('vs_infer_b1'))} b1)",
              f"{_f(r.get('peak_rss_engine_mb'), '{:.0f}')} / {_f(rss, '{:.0f}')}",
              _pct(par.get("top1_agreement")), _f(par.get("max_abs_dp"), "{:.1e}"), _pct(par.get("accuracy"))]
    return "| " + " | ".join(cells) + " |"


_COMBINATIONS_LEGEND = (
    "× torch: inference-only speed-up over torch eager fp32 at the same batch size. "
    "infer img/s: the better of synchronous calls and pipelined asynchronous requests (where the backend has them). "
    "load cold: first load in a fresh process, no cache option (as `classify`); warm: OpenVINO with "
    "`options={'cache_dir': ...}` already populated, other backends a second load. "
    "e2e: `Classifier.stream` on the files (decode + preprocess + infer + softmax). predict_one: warm, one file, "
    "with decode; (× b1) = its p50 over inference-only batch-1 p50. Peak RSS: engine = sampled peak while "
    "loading and running the backend alone; +Classifier = the job's peak including `cxr_edge.load` and the "
    "end-to-end runs.")


def _combinations(report: dict) -> list[str]:
    """The main table: one row per measured combination, its legend, and per-row notes."""
    recs = report["records"]
    bss = [str(b) for b in report["settings"]["batch_sizes"]]
    ebs = report["settings"]["e2e_batch_size"]
    head = (["combination", "gate (model.json / bench)", "status", "MB", "load cold / warm s"]
            + [f"infer img/s b{b} (× torch)" for b in bss]
            + [f"e2e img/s b{ebs}", "e2e / infer", "predict_one p50 ms", "peak RSS MB engine / +Classifier", "agree",
               "max |Δp|", "acc"])
    L = ["## Combinations", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    L += [row for c in recs if (row := _combination_row(c, bss, len(head))) is not None]
    L += ["", _COMBINATIONS_LEGEND, ""]
    notes = [(c["key"], n) for c in recs for n in (c["forced"] and f"attempted although unavailable: {c['forced']}",
                                                     c["results"].get("e2e_note")) if n]
    if notes:
        L += ["Notes:", ""] + [f"- {k}: {n}" for k, n in notes] + [""]
    return L


def _latency(report: dict) -> list[str]:
    """Inference-only latency per combination and batch size, with threads and load averages."""
    L = ["## Inference-only latency per batch (ms)", "",
         "| combination | batch | p50 | p90 | p99 | sync img/s | async img/s | threads / streams | load avg before → after |",
         "|---|---|---|---|---|---|---|---|---|"]
    for c in report["records"]:
        r = c["results"]
        th = r.get("threads") or {}
        thr = "/".join(str(th[k]) for k in ("inference_num_threads", "torch_num_threads", "intra_op_num_threads",
                                            "streams") if k in th) or "–"
        la = r.get("loadavg_1m") or [None, None]
        for b, rec in (r.get("infer") or {}).items():
            L.append(f"| {c['key']} | {b} | {rec['p50_ms']:.2f} | {rec['p90_ms']:.2f} | {rec['p99_ms']:.2f} | "
                     f"{rec['sync_ips']:.1f} | {_f(rec.get('async_ips'))} | {thr} | "
                     f"{_f(la[0], '{:.1f}')} → {_f(la[1], '{:.1f}')} |")
    return L + [""]


def _parity_row(c: dict) -> str:
    """One row of the parity table (a combination with a measured parity)."""
    par = c["results"]["parity"]
    rd = ", ".join(f"{k} {100 * v:+.1f}" for k, v in (par.get("recall_delta") or {}).items()) or "–"
    g = c["results"].get("gate_bench") or {}
    gate = "PASS" if g.get("passed") else ("FAIL: " + "; ".join(g.get("failures", [])))
    return (f"| {c['key']} | {par['n']} | {_pct(par['top1_agreement'], 2)} | {par['max_abs_dp']:.2e} | "
            f"{par['mean_abs_dp']:.2e} | {_pct(par.get('accuracy'))} | "
            f"{_f(100 * par['accuracy_delta'] if 'accuracy_delta' in par else None, '{:+.2f}')} | {rd} | "
            f"{_uncertain_cell(par)} | {_by_source_cell(par)} | {gate} |")


def _parity_detail(report: dict) -> list[str]:
    """Parity of every measured combination against torch fp32, or why none was measured."""
    recs = report["records"]
    L = ["## Parity vs torch fp32 (same tensors)", "",
         "| combination | n | top-1 agree | max |Δp| | mean |Δp| | accuracy | Δacc pp | recall Δ pp per class | uncertain | "
         "agree per source | bench gate |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    L += [_parity_row(c) for c in recs if c["results"].get("parity")]
    if not any(c["results"].get("parity") for c in recs):
        notes = sorted({c["results"].get("parity_note") for c in recs if c["results"].get("parity_note")})
        L += ["", "No parity measured: " + ("; ".join(notes) if notes else "no torch fp32 reference ran") + "."]
    return L + [""]


def _not_measured(report: dict) -> list[str]:
    """Combinations unavailable here or failed, with their reasons (none: no section)."""
    bad = [c for c in report["records"] if c["status"] in ("unavailable", "error")]
    if not bad:
        return []
    L = ["## Not measured here", "", "| combination | status | reason |", "|---|---|---|"]
    for c in bad:
        reason = (c["reason"] or "").replace("|", "/").replace("\n", " ")
        L.append(f"| {c['key']} | {c['status']} | {reason[:300]} |")
    return L + [""]


def _reference_pipeline(report: dict) -> list[str]:
    """The torchvision + torch eager pipeline's speed, when it was asked for."""
    rp = report.get("reference_pipeline")
    if not rp:
        return []
    L = ["## Reference pipeline (what a user would otherwise write)", ""]
    if rp.get("status") != "ok":
        return L + [f"- not measured: {rp.get('error')}", ""]
    e = rp["e2e"]
    return L + [f"- {e['pipeline']}, batch {e['batch_size']}: **{e['ips']:.1f} img/s** "
                f"over {e['images']} images; torch threads {rp.get('torch_num_threads')}; "
                f"peak RSS {_f(rp.get('peak_rss_mb', rp.get('peak_rss_sampled_mb')), '{:.0f}')} MB", ""]


def _soak(report: dict) -> list[str]:
    """The soak run's throughput, errors and RSS slope, when one ran."""
    sk = report.get("soak")
    if not sk:
        return []
    if sk.get("status") != "ok":
        return ["## Soak", "", f"- failed: {sk.get('error')}", ""]
    return ["## Soak", "",
            f"- {sk['images']} images through `Classifier.stream` ({sk['backend']} {sk['precision']}) at "
            f"{sk['ips']:.1f} img/s, {sk['errors']} errors; RSS {sk['rss_mb'][0][1]:.0f} → {sk['rss_mb'][-1][1]:.0f} MB; "
            f"slope **{_f(sk.get('slope_mb_per_1000'), '{:+.2f}')} MB / 1000 images** ({sk['slope_fit']})", ""]


def draw_chart(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [c for c in report["records"] if c["status"] == "ok" and c["results"].get("infer")]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 6.4), gridspec_kw={"width_ratios": [1.35, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(recs):
        inf = c["results"]["infer"]
        bs = sorted(int(b) for b in inf)
        ips = [inf[str(b)]["ips"] for b in bs]
        par = c["results"].get("parity") or {}
        g = c["results"].get("gate_bench") or {}
        agree = par.get("top1_agreement")
        passed = g.get("passed", c["reference"]) or _too_few(g)
        label = f"{c['key']}  agree {_pct(agree)}" + ("" if passed else "  ✗ parity FAIL") + (" (auto)" if c["auto"] else "")
        ax.plot(bs, ips, ("--" if c["reference"] else "-"), color=colors[i % len(colors)],
                marker="o" if passed else "X", markersize=9 if not passed else 7,
                markeredgecolor="black" if passed else "red", markeredgewidth=0.8 if passed else 2,
                lw=2.5 if c["auto"] else 1.5, label=label)
    ax.set_xscale("log", base=2)
    every = [rec["ips"] for c in recs for rec in c["results"]["infer"].values() if rec["ips"] > 0]
    if every and max(every) / min(every) > 20:
        from matplotlib.ticker import FormatStrFormatter, LogLocator
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
    allbs = sorted({int(b) for c in recs for b in c["results"]["infer"]})
    if allbs:
        ax.set_xticks(allbs)
        ax.set_xticklabels([str(b) for b in allbs])
    ax.set_xlabel("batch size")
    ax.set_ylabel("inference-only throughput (images / s)")
    ax.set_title("Inference only, per backend / precision\n(o parity passed, X parity failed vs torch fp32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if ax.get_yscale() == "linear":
        ax.set_ylim(bottom=0)

    names, vals, cols, fails = [], [], [], []
    for i, c in enumerate(recs):
        e = c["results"].get("e2e")
        if e:
            names.append(c["key"] + (" (auto)" if c["auto"] else ""))
            vals.append(e["ips"])
            cols.append(colors[i % len(colors)])
            g = c["results"].get("gate_bench") or {}
            fails.append(not (g.get("passed", c["reference"]) or _too_few(g)))
    rp = report.get("reference_pipeline")
    if rp and rp.get("status") == "ok":
        names.append("torchvision + torch\n(reference pipeline)")
        vals.append(rp["e2e"]["ips"])
        cols.append("0.5")
        fails.append(False)
    y = range(len(names))
    bars = bx.barh(list(y), vals, color=cols)
    for bar, bad in zip(bars, fails):
        if bad:
            bar.set_hatch("xx")
            bar.set_edgecolor("red")
    bx.set_yticks(list(y))
    bx.set_yticklabels(names, fontsize=9)
    bx.invert_yaxis()
    for yi, v in zip(y, vals):
        bx.text(v, yi, f" {v:.1f}" + ("  parity FAIL" if fails[yi] else ""), va="center", fontsize=9)
    bx.set_xlim(0, max(vals or [1]) * 1.25)
    bx.set_xlabel("images / s (decode + preprocess + infer)")
    bx.set_title(f"End to end on files, batch {report['settings']['e2e_batch_size']}\n(hatched red: parity failed)")
    bx.grid(True, axis="x", alpha=0.3)
    cpu = report["host"]["cpu"]
    fig.suptitle(f"cxr-edge bench: {report['package']['name']} on {cpu['model']} ({cpu['logical_cores']} cores), "
                 f"{report['data']['images']} images", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(report: dict, out_dir: Path, chart: bool = True):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    if chart:
        try:
            draw_chart(report, out_dir / "throughput.png")
        except ImportError:      # an edge install has no matplotlib: the tables are the report
            return False
    return chart
