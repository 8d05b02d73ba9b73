"""Sink + source: a DICOM node (pynetdicom Storage SCP) that classifies what a station sends it.

    station --C-STORE image--> cxr-edge serve-dicom --SR file--> --store-sr DIR
                                                    --C-STORE SR--> --forward HOST:PORT:AE (PACS, RIS)

Flow inside the node (one way, like the rest of cxr-edge):
  association threads (pynetdicom, one per peer)      one worker thread
  C-STORE handler: parse + check the data set  ──►  bounded queue  ──►  batch of up to --batch-size items
  (failure status at once for a malformed one)        (backpressure:     -> Classifier.predict (same decode/
  then wait for the worker's verdict                   the handler waits    preprocess/backend as classify)
                                                       for room)          -> SR (dicom_sr.build_sr), written
                                                                             atomically / forwarded
  C-STORE response = the outcome for that image: 0x0000 only once its SR is written and forwarded.

Statuses sent back (PS3.4 Table B.2-1 ranges; ErrorComment says why):
  0x0000 success; 0xA700 out of resources (queue full past --queue-timeout, shutting down, SR not
  written/forwarded); 0xA900 data set does not match SOP class (no pixel data, UIDs missing);
  0xC210 cannot understand (data set cannot be parsed); 0xC100 cannot understand (the image could
  not be decoded/classified: the decoder's message). pynetdicom itself uses 0xC211-0xC213 for handler
  faults, which never happen here.

Log: one JSON object per line (default stdout): "start", "echo", "image" (per received image, with
latency_ms = receive -> SR written, total_ms = receive -> response ready), "rejected", "stop".
SIGINT/SIGTERM: stop accepting associations, finish every image already received, then exit.

Needs `pip install 'cxr-edge[dicom-node]'` (pynetdicom, highdicom); imported lazily by the CLI.
"""
from __future__ import annotations

import json
import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# PS3.4 B.5 Storage SOP Classes accepted. Secondary Capture too: radiographs exported from PACS or
# research sets (e.g. NIH ChestX-ray14 as DICOM) are usually SC with Modality DX/CR.
ACCEPTED_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
VERIFICATION = "1.2.840.10008.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_PARSE = 0xC210
CANNOT_CLASSIFY = 0xC100

log = logging.getLogger("cxr_edge.dicom_node")


def _require():
    try:
        import pynetdicom  # noqa: F401
        import highdicom  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the DICOM node needs pynetdicom and highdicom: pip install 'cxr-edge[dicom-node]' ({e})") from None


def parse_forward(text: str) -> tuple[str, int, str]:
    """'HOST:PORT:AE' -> (host, port, ae_title). The host may itself hold colons (IPv6)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ValueError(f"--forward {text!r}: expected HOST:PORT:AE_TITLE, e.g. pacs.local:104:PACS")
    host, port, ae = parts
    try:
        port_n = int(port)
    except ValueError:
        raise ValueError(f"--forward {text!r}: port {port!r} is not a number") from None
    if not 0 < port_n < 65536:
        raise ValueError(f"--forward {text!r}: port {port_n} out of range")
    check_ae_title(ae, "--forward")
    return host.strip("[]"), port_n, ae


def check_ae_title(ae: str, what: str = "--ae-title") -> str:
    """Return `ae` when it is a valid AE title (DICOM PS3.5 section 6.2, VR AE); `what` names the option.

    Rule checked: 1-16 ASCII characters, not all spaces, no backslash.

    Raises:
        ValueError: naming `what` and the value.
    """
    if not ae or len(ae) > 16 or not ae.isascii() or "\\" in ae or not ae.strip():
        raise ValueError(f"{what} {ae!r}: an AE title is 1-16 ASCII characters, no backslash")
    return ae


@dataclass
class _Item:
    data: bytes                      # the data set as received, DICOM Part 10 (preamble + meta)
    header: object                   # pydicom Dataset (pixel data included; dicom_sr ignores it)
    sop_uid: str
    sop_class: str
    calling_ae: str
    peer: str
    t_received: float                # time.monotonic() when the handler got the complete data set
    done: threading.Event = field(default_factory=threading.Event)
    status: int = OUT_OF_RESOURCES
    comment: str = ""


_STOP = object()


class DicomNode:
    """A Storage SCP + Verification SCP around one `Classifier`.

    classifier: a loaded `cxr_edge.Classifier` (used from the worker thread only).
    ae_title, host, port: where to listen (port 0: an ephemeral port; read `.port` after start()).
    store_sr: folder for SR_<SOPInstanceUID>.dcm files (created), or None.
    forward: (host, port, ae_title) of a Storage SCP to C-STORE every SR to, or None.
    queue_size: images received but not yet classified (bounded: memory <= queue_size x image bytes);
    queue_timeout: seconds a handler waits for room before answering 0xA700.
    log_stream: where the JSON lines go (a text file object), None for none.
    """

    def __init__(self, classifier, ae_title: str = "CXREDGE", host: str = "0.0.0.0", port: int = 11112,
                 store_sr=None, forward: tuple | None = None, queue_size: int = 32,
                 queue_timeout: float = 60.0, batch_size: int | None = None, log_stream=sys.stdout,
                 max_associations: int = 10):
        _require()
        from .dicom_sr import AlgorithmInfo
        self.clf = classifier
        self.ae_title = check_ae_title(ae_title)
        self.host, self.port = host, int(port)
        self.store_sr = Path(store_sr) if store_sr else None
        if self.store_sr:
            self.store_sr.mkdir(parents=True, exist_ok=True)
        self.forward = forward
        self.batch_size = max(1, int(batch_size or classifier.batch_size))
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self.queue_timeout = float(queue_timeout)
        self.log_stream = log_stream
        self.max_associations = max_associations
        self.algo = AlgorithmInfo.from_classifier(classifier)
        self.counts = {"received": 0, "succeeded": 0, "failed": 0, "rejected": 0, "echo": 0}
        self._log_lock = threading.Lock()
        self._stopping = threading.Event()
        self._inflight = 0                       # handlers between "accepted" and "responded"
        self._inflight_cv = threading.Condition()
        self._server = None
        self._worker = None
        self._ae = None

    # -- logging ---------------------------------------------------------------------------------
    def _count(self, key: str):
        with self._log_lock:
            self.counts[key] += 1

    def _log(self, event: str, **fields):
        if self.log_stream is None:
            return
        rec = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = json.dumps(rec, default=str)
        with self._log_lock:
            try:
                self.log_stream.write(line + "\n")
                self.log_stream.flush()
            except (OSError, ValueError):
                pass

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "DicomNode":
        """Warm up, then listen (non-blocking) and start the classification worker; returns self.

        Accepts the storage SOP classes in ACCEPTED_STORAGE (any transfer syntax) and Verification. With port 0,
        `self.port` becomes the port actually bound. Raises OSError when the port cannot be bound.
        """
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        self._warm_up()
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        for uid in ACCEPTED_STORAGE:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)  # OSError: port taken
        self._ae = ae
        self._worker = threading.Thread(target=self._work, name="cxr-dicom-worker", daemon=True)
        self._worker.start()
        self.port = self._server.server_address[1]
        self._log("start", ae_title=self.ae_title, host=self.host, port=self.port,
                  store_sr=str(self.store_sr) if self.store_sr else None,
                  forward=":".join(map(str, self.forward)) if self.forward else None,
                  model=self.algo.name, model_sha256=self.algo.digest, backend=self.algo.backend,
                  precision=self.algo.precision, batch_size=self.batch_size, queue_size=self.queue.maxsize)
        return self

    def _warm_up(self):
        """First inference and first SR build pay one-off costs (kernel setup; highdicom/pydicom code
        dictionaries, ~2 s): pay them before the first station image, not on it."""
        import numpy as np
        from pydicom.dataset import Dataset
        from pydicom.uid import generate_uid
        from .dicom_sr import build_sr
        r = self.clf.predict_one(np.zeros((64, 64), np.float32))
        if r.ok:
            h = Dataset()
            h.SOPClassUID, h.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
            h.StudyInstanceUID, h.SeriesInstanceUID = generate_uid(), generate_uid()
            h.Rows = h.Columns = 64
            build_sr(h, r, self.algo)

    def stop(self, timeout: float = 120.0):
        """Stop accepting associations, answer new C-STOREs 0xA700, finish every image already
        received (its SR written/forwarded and its response sent), then close. Idempotent."""
        if self._server is None:
            return
        with self._inflight_cv:                      # from here on a C-STORE is either counted or refused
            self._stopping.set()
        self._server.shutdown()                      # no new associations
        deadline = time.monotonic() + timeout
        with self._inflight_cv:                      # every accepted image answered
            while self._inflight and time.monotonic() < deadline:
                self._inflight_cv.wait(0.1)
        self.queue.put(_STOP)
        self._worker.join(max(0.0, deadline - time.monotonic()))
        self._ae.shutdown()                          # associations still open (idle peers) are closed
        self._server = None
        self._log("stop", **self.counts)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- event handlers (association threads) ------------------------------------------------------
    def _on_echo(self, event):
        self._count("echo")
        self._log("echo", calling_ae=_calling_ae(event), peer=_peer(event))
        return SUCCESS

    def _reject(self, event, status: int, why: str, sop_uid: str | None, t0: float):
        self._count("rejected")
        self._log("rejected", sop_instance_uid=sop_uid, calling_ae=_calling_ae(event), peer=_peer(event),
                  status=f"0x{status:04X}", error=why, total_ms=round((time.monotonic() - t0) * 1e3, 2))
        log.warning("C-STORE %s from %s refused (0x%04X): %s", sop_uid, _calling_ae(event), status, why)
        return _status(status, why)

    def _on_store(self, event):
        t0 = time.monotonic()
        req_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "") or None
        with self._inflight_cv:
            if self._stopping.is_set():
                refuse = True
            else:
                refuse = False
                self._inflight += 1                  # stop() waits for this image's answer
        if refuse:
            return self._reject(event, OUT_OF_RESOURCES, "node is shutting down", req_uid, t0)
        try:
            return self._store(event, req_uid, t0)
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                self._inflight_cv.notify_all()

    def _store(self, event, req_uid, t0):
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = event.dataset
            ds.file_meta = event.file_meta
            _ = list(ds.keys())                      # pydicom parses lazily: force it here
            for elem in ds:                          # raw elements -> decoded values (catches bad lengths/VRs)
                _ = elem.value
        except Exception as e:
            return self._reject(event, CANNOT_PARSE, f"data set cannot be parsed: {type(e).__name__}: {e}",
                                req_uid, t0)
        sop_uid = str(ds.get("SOPInstanceUID", "") or "") or req_uid
        missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                               "Rows", "Columns") if not str(ds.get(k, "") or "").strip()]
        if "PixelData" not in ds:
            missing.append("PixelData")
        if missing:
            return self._reject(event, DOES_NOT_MATCH_SOP_CLASS, "data set lacks " + ", ".join(missing), sop_uid, t0)
        del ds.PixelData                             # classified from `data`; the header need not hold it twice
        item = _Item(data=data, header=ds, sop_uid=sop_uid, sop_class=str(ds.SOPClassUID),
                     calling_ae=_calling_ae(event), peer=_peer(event), t_received=t0)
        try:
            self.queue.put(item, timeout=self.queue_timeout)      # backpressure: wait for room
        except queue.Full:
            return self._reject(event, OUT_OF_RESOURCES,
                                f"busy: {self.queue.maxsize} images queued for {self.queue_timeout:.0f} s",
                                sop_uid, t0)
        self._count("received")
        if not item.done.wait(self.queue_timeout + 600):
            return _status(OUT_OF_RESOURCES, "classification did not finish in time")
        return SUCCESS if item.status == SUCCESS else _status(item.status, item.comment)

    # -- worker ---------------------------------------------------------------------------------------
    def _work(self):
        stop = False
        while not stop:
            first = self.queue.get()
            if first is _STOP:
                break
            batch = [first]
            while len(batch) < self.batch_size:          # batch what has already arrived; never wait for more
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self._process(batch)
            except Exception as e:                       # a bug here must not strand the waiting handlers
                log.exception("worker failed on a batch")
                for it in batch:
                    if not it.done.is_set():
                        it.status, it.comment = OUT_OF_RESOURCES, f"internal error: {type(e).__name__}"
                        it.done.set()

    def _process(self, batch: list[_Item]):
        from .dicom_sr import build_sr, sr_filename, write_atomic
        t_start = time.monotonic()
        # one image: decode in this thread (no pool to start); several: the Classifier's pipelined batch path
        results = ([self.clf.predict_one(batch[0].data)] if len(batch) == 1
                   else self.clf.predict([it.data for it in batch]))
        t_classified = time.monotonic()
        srs: list = [None] * len(batch)
        written: list = [None] * len(batch)
        errors: list = [None] * len(batch)
        t_sr: list = [None] * len(batch)
        sr_ms: list = [None] * len(batch)
        for k, (it, r) in enumerate(zip(batch, results)):
            t_build = time.monotonic()
            if not r.ok:
                it.status, errors[k] = CANNOT_CLASSIFY, (r.error or "").replace("<bytes>: ", "", 1)
                continue
            try:
                srs[k] = build_sr(it.header, r, self.algo)
                if self.store_sr:
                    written[k] = write_atomic(srs[k], self.store_sr, sr_filename(it.header))
                t_sr[k] = time.monotonic()
                sr_ms[k] = round((t_sr[k] - t_build) * 1e3, 2)
                it.status = SUCCESS
            except Exception as e:
                it.status, errors[k] = OUT_OF_RESOURCES, f"SR not built/written: {type(e).__name__}: {e}"
                srs[k] = None
        forwarded = [None] * len(batch)
        if self.forward and any(s is not None for s in srs):
            fwd = self._forward([s for s in srs if s is not None])
            it_fwd = iter(fwd)
            for k, s in enumerate(srs):
                if s is not None:
                    ok, why = next(it_fwd)
                    forwarded[k] = ok
                    if not ok:
                        batch[k].status, errors[k] = OUT_OF_RESOURCES, f"SR not forwarded: {why}"
        t_end = time.monotonic()
        for k, (it, r) in enumerate(zip(batch, results)):
            it.comment = errors[k] or ""
            ok = it.status == SUCCESS
            self._count("succeeded" if ok else "failed")
            self._log("image", sop_instance_uid=it.sop_uid, sop_class_uid=it.sop_class, calling_ae=it.calling_ae,
                      peer=it.peer, status=f"0x{it.status:04X}", label=r.label if r.ok else None,
                      probabilities={c: round(p, 6) for c, p in r.probabilities.items()} if r.ok else None,
                      uncertain=getattr(r, "uncertain", None), sr=str(written[k]) if written[k] else None,
                      forwarded=forwarded[k], error=errors[k], batch=len(batch),
                      queue_ms=round((t_start - it.t_received) * 1e3, 2),
                      classify_ms=round((t_classified - t_start) * 1e3, 2), sr_ms=sr_ms[k],
                      latency_ms=round((t_sr[k] - it.t_received) * 1e3, 2) if t_sr[k] else None,
                      total_ms=round((t_end - it.t_received) * 1e3, 2))
            if not ok:
                log.warning("%s from %s failed (0x%04X): %s", it.sop_uid, it.calling_ae, it.status, errors[k])
            it.done.set()

    def _forward(self, srs: list) -> list[tuple[bool, str]]:
        """C-STORE each SR to the --forward peer over one association: [(ok, why)] in order."""
        from pynetdicom import AE
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        host, port, ae_title = self.forward
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(COMPREHENSIVE_SR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        try:
            assoc = ae.associate(host, port, ae_title=ae_title)
        except Exception as e:
            return [(False, f"{host}:{port} {ae_title}: {e}")] * len(srs)
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association aborted/unreachable"
            return [(False, f"{host}:{port} {ae_title}: {why}")] * len(srs)
        out = []
        try:
            for sr in srs:
                try:
                    st = assoc.send_c_store(sr)
                except Exception as e:
                    out.append((False, f"{type(e).__name__}: {e}"))
                    continue
                code = int(getattr(st, "Status", -1)) if st else -1
                out.append((code == 0, "ok" if code == 0 else
                            f"peer answered 0x{code:04X}" if code >= 0 else "no response from peer"))
        finally:
            if assoc.is_established:
                assoc.release()
        return out


def _status(code: int, comment: str):
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = " ".join(comment.split())[:64]      # LO: at most 64 characters
    return ds


def _calling_ae(event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:
        return ""


def _peer(event) -> str:
    try:
        r = event.assoc.requestor
        return f"{r.address}:{r.port}"
    except Exception:
        return ""


# -- CLI ----------------------------------------------------------------------------------------------
def add_parser(sub):
    """Register `cxr-edge serve-dicom` (pynetdicom/highdicom are imported only when it runs)."""
    p = sub.add_parser("serve-dicom", help="DICOM node: receive CR/DX images (C-STORE), answer with a DICOM SR",
                       description="A DICOM Storage SCP (and C-ECHO) that classifies every CR/DX/SC image it "
                                   "receives and writes and/or forwards a Comprehensive SR (TID 1500) for it. "
                                   "One JSON line per image on the log. SIGINT/SIGTERM: finish received images, "
                                   "then stop. Not for diagnostic use.")
    p.add_argument("--ae-title", default="CXREDGE", help="this node's AE title (default CXREDGE)")
    p.add_argument("--port", type=int, default=11112, help="TCP port to listen on (default 11112; 0: any free port)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default all interfaces)")
    p.add_argument("--store-sr", metavar="DIR", help="write each SR as DIR/SR_<source SOPInstanceUID>.dcm")
    p.add_argument("--forward", metavar="HOST:PORT:AE", help="C-STORE each SR to this Storage SCP (PACS/RIS)")
    from .cli import _add_model_options        # --model/--backend/--precision/--batch-size/--threads, as classify
    _add_model_options(p)
    p.add_argument("--queue-size", type=int, default=32, help="images received but not yet classified (default 32)")
    p.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a sender waits for room in a full queue before 0xA700 (default 60)")
    p.add_argument("--log", metavar="FILE", default="-", help="JSON-lines log (default '-': stdout)")
    p.set_defaults(func=cmd_serve_dicom)


class _OneLine(logging.Filter):
    """pynetdicom logs a socket closed under an association (a peer gone, or our shutdown) with a
    traceback; the node's log stays one line per event: the exception becomes part of the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith("pynetdicom"):
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def cmd_serve_dicom(args) -> int:
    """`cxr-edge serve-dicom`: run a DicomNode until SIGINT/SIGTERM, then finish received images; returns 0.

    Raises:
        UsageError: pynetdicom/highdicom missing, or a bad --ae-title, --forward, --port, --batch-size or --queue-size.
    """
    from .cli import UsageError
    try:
        _require()
    except ImportError as e:
        raise UsageError(str(e)) from None
    try:
        check_ae_title(args.ae_title)
        forward = parse_forward(args.forward) if args.forward else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port}: out of range")
    if args.batch_size < 1 or args.queue_size < 1:
        raise UsageError("--batch-size and --queue-size must be >= 1")
    if not args.store_sr and not forward:
        print("cxr-edge: warning: neither --store-sr nor --forward given: results go to the log only",
              file=sys.stderr)
    if not args.verbose:
        logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    for h in logging.getLogger().handlers:           # pynetdicom's modules log on child loggers
        h.addFilter(_OneLine())
    import cxr_edge
    clf = cxr_edge.load(args.model, backend=args.backend, precision=args.precision, batch_size=args.batch_size,
                        threads=args.threads)
    stream = sys.stdout if args.log == "-" else open(args.log, "a", encoding="utf-8")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    node = DicomNode(clf, ae_title=args.ae_title, host=args.host, port=args.port, store_sr=args.store_sr,
                     forward=forward, queue_size=args.queue_size, queue_timeout=args.queue_timeout,
                     batch_size=args.batch_size, log_stream=stream)
    try:
        node.start()
        print(f"cxr-edge: {clf.why.split(' | ')[0]}", file=sys.stderr)
        print(f"cxr-edge: DICOM node {args.ae_title} listening on {args.host}:{node.port}"
              + (f"; SR -> {args.store_sr}" if args.store_sr else "")
              + (f"; forward -> {args.forward}" if forward else ""), file=sys.stderr)
        print(f"cxr-edge: {cxr_edge.DISCLAIMER}", file=sys.stderr)
        while not stop.wait(0.5):
            pass
        print("cxr-edge: stopping: finishing images already received", file=sys.stderr)
    finally:
        node.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        clf.close()
        if stream is not sys.stdout:
            stream.close()
    c = node.counts
    print(f"cxr-edge: stopped: {c['succeeded']} classified, {c['failed']} failed, {c['rejected']} refused",
          file=sys.stderr)
    return 0
