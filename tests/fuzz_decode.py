#!/usr/bin/env python
"""Fuzz target: decode(bytes) on mutated generated seeds, and DICOM header mutations. Bounded.

    python tests/fuzz_decode.py --seconds 60          # what CI runs (<= 60 s)
    python tests/fuzz_decode.py --seconds 600 --save  # longer; minimised findings -> tests/corpus/decode/

Every input runs in a worker process with a 3 GB address-space limit. A finding is: an exception
other than DecodeError escaping decode ("escape"), a result that is not a finite float32 H x W image
or an error message that does not start with the input's name ("bad"), a decode taking longer than
--hang seconds ("hang"), or the worker dying (signal, kernel OOM: "crash"). Findings are minimised
(chunk deletion while the finding stays the same) and, with --save, written to tests/corpus/decode/
as <kind>-<sha1>.bin, which tests/test_decode_hostile.py::test_corpus_regressions replays. Seeds
are generated (tests/hostile_inputs.py), never real images. Exit status: 1 when something was found.
The pytest suite runs the same properties through hypothesis (tests/test_fuzz_decode.py).
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
CORPUS = HERE / "corpus" / "decode"


def _worker(conn):
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    from cxr_edge.decode import DecodeError, decode
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        try:
            d = decode(data)
            p = d.pixels
            ok = p.ndim == 2 and p.dtype == np.float32 and p.size > 0 and bool(np.isfinite(p).all()) \
                and float(p.min()) >= 0 and float(p.max()) <= 1
            conn.send(("ok", "") if ok else ("bad", f"pixels {p.shape} {p.dtype}"))
        except DecodeError as e:
            conn.send(("refused", "") if str(e).startswith("<bytes>: ") else ("bad", f"message: {e}"))
        except BaseException as e:  # noqa: BLE001 - that is the finding
            conn.send(("escape", f"{type(e).__name__}: {str(e)[:200]}"))


class Runner:
    def __init__(self, hang: float):
        self.hang = hang
        self.ctx = mp.get_context("fork")
        self.proc = None
        self._start()

    def _start(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()

    def run(self, data: bytes, hang: float | None = None) -> tuple[str, str]:
        self.conn.send_bytes(data)
        if not self.conn.poll(hang or self.hang):
            self._start()
            return "hang", f"over {hang or self.hang:g} s"
        try:
            return self.conn.recv()
        except EOFError:
            code = self.proc.exitcode
            self._start()
            return "crash", f"worker died (exit {code})"

    def close(self):
        self.proc.kill()


def minimise(runner: Runner, data: bytes, kind: str, budget_s: float = 30.0) -> bytes:
    """Delete chunks (halving their size) while the same kind of finding persists."""
    t_end = time.monotonic() + budget_s
    chunk = max(1, len(data) // 2)
    while chunk >= 1 and time.monotonic() < t_end:
        i, changed = 0, False
        while i < len(data) and time.monotonic() < t_end:
            cand = data[:i] + data[i + chunk:]
            if cand and runner.run(cand)[0] == kind:
                data, changed = cand, True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--hang", type=float, default=5.0, help="seconds after which one decode is a hang")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--save", action="store_true", help="write minimised findings to tests/corpus/decode/")
    args = ap.parse_args(argv)
    import hostile_inputs as H
    seeds = H.seeds()
    names = sorted(seeds)
    dicoms = [n for n in names if n.startswith("dcm") and "raw" not in n]
    seed = args.seed if args.seed is not None else int(time.time())
    rng = np.random.default_rng(seed)
    runner = Runner(args.hang)
    known = {p.read_bytes() for p in CORPUS.glob("*.bin")} if CORPUS.is_dir() else set()
    for k in known:                                  # the corpus must stay fixed
        status, detail = runner.run(k)
        if status not in ("ok", "refused"):
            print(f"REGRESSION in corpus: {status} {detail}")
    stats, findings, execs = {}, [], 0
    t_end = time.monotonic() + args.seconds
    while time.monotonic() < t_end:
        if rng.integers(0, 4) == 0:
            base = dicoms[int(rng.integers(0, len(dicoms)))]
            data = H.mutate_dicom_header(seeds[base], rng)
            if rng.integers(0, 2):
                data = H.mutate(data, rng)
            base = "dicom-header:" + base
        else:
            base = names[int(rng.integers(0, len(names)))]
            data = H.mutate(seeds[base], rng)
        status, detail = runner.run(data)
        execs += 1
        stats[status] = stats.get(status, 0) + 1
        if status not in ("ok", "refused"):
            key = (status, detail.split(":")[0])
            if any(f[0] == key for f in findings):
                continue
            small = minimise(runner, data, status) if status != "hang" else data
            findings.append((key, small, base, detail))
            print(f"FINDING {status} from {base}: {detail} ({len(data)} -> {len(small)} bytes)", flush=True)
    runner.close()
    print(f"fuzz seed {seed}: {execs} executions in {args.seconds:g} s, {stats}, {len(findings)} distinct findings")
    if args.save and findings:
        CORPUS.mkdir(parents=True, exist_ok=True)
        for (status, _), small, base, detail in findings:
            p = CORPUS / f"{status}-{hashlib.sha1(small).hexdigest()[:12]}.bin"
            p.write_bytes(small)
            print(f"saved {p.relative_to(HERE.parent)}  ({base}: {detail})")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
