"""Which combinations to measure: read from the one formats table (formats.RUN_PRECISIONS), the
package's artifacts and gates, and each backend's availability here. Unavailable combinations
stay in the plan with the reason, so the report shows what this machine cannot run and why."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cxr_edge.backends import REGISTRY, backend_status, decide, precision_support
from cxr_edge.formats import BACKEND_ORDER, RUN_PRECISIONS, artifact_format


@dataclass
class Combo:
    backend: str
    precision: str
    artifact: str | None = None          # file name in the package
    artifact_precision: str | None = None
    artifact_mb: float | None = None
    status: str = "planned"              # planned -> ok | error ; or unavailable
    reason: str = ""                     # why unavailable / the error
    gate: str = "not recorded"           # gate recorded in model.json: passed | failed: ... | reference | ...
    auto: bool = False                   # what `classify` with backend=auto picks here
    reference: bool = False              # the torch fp32 reference
    forced: str = ""                     # attempted although unavailable (try_unavailable)
    results: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.precision}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["key"] = self.key
        return d


def _gate_text(art, key: str, backend: str) -> str:
    if backend == "torch":
        return "reference"
    g = art.gate.get(key)
    if not g:
        return "not recorded"
    if g.get("passed"):
        return "passed"
    if g.get("skipped"):
        return f"not measured at export ({g['skipped']})"
    return "failed: " + "; ".join(g.get("failures", [])) if g.get("failures") else "failed"


def plan(package, backends=None, precisions=None, try_unavailable: bool = False) -> list[Combo]:
    """Every (backend, run precision) of the formats table that the filters allow, fastest first.
    The torch fp32 reference is always included: parity and speed-ups are measured against it."""
    status = backend_status()
    auto = auto_choice(package)
    want_b = set(backends) if backends else None
    want_p = set(precisions) if precisions else None
    out = []
    for name in BACKEND_ORDER:
        if name not in REGISTRY:
            continue
        ok, why = status[name]
        for prec, src in RUN_PRECISIONS[name].items():
            is_ref = name == "torch" and prec == "fp32"
            if not is_ref and ((want_b and name not in want_b) or (want_p and prec not in want_p)):
                continue
            art = package.artifact(src, artifact_format(src).name)
            c = Combo(name, prec, reference=is_ref, auto=auto == (name, prec))
            if art is None:
                c.status, c.reason = "unavailable", f"package has no {src} artifact"
                out.append(c)
                continue
            c.artifact, c.artifact_precision = art.file, art.precision
            c.artifact_mb = (art.bytes or package.path(art).stat().st_size) / 1e6
            c.gate = _gate_text(art, c.key, name)
            reason = ""
            if not ok:
                reason = why
            else:
                supported, why_not = precision_support(name, prec)
                if not supported:
                    reason = why_not
            if reason:
                if try_unavailable:
                    c.forced = reason
                else:
                    c.status, c.reason = "unavailable", reason
            out.append(c)
    # precisions asked for explicitly that a requested backend does not run at all
    if want_b and want_p:
        for name in sorted(want_b):
            for prec in sorted(want_p - set(RUN_PRECISIONS.get(name, {}))):
                out.append(Combo(name, prec, status="unavailable", reason=f"not a precision {name} runs "
                                 f"(formats.RUN_PRECISIONS: {', '.join(RUN_PRECISIONS.get(name, {})) or 'unknown backend'})"))
    return out


def auto_choice(package) -> tuple[str, str] | None:
    """What `auto` picks here from the evidence already cached (cxr_edge.backends.decide without
    measuring: speeds and device verdicts from earlier loads or `cxr-edge verify`)."""
    d = decide(package, "auto", "auto", measure=False)
    return (d.ranked[0].backend, d.ranked[0].precision) if d.ranked else None
