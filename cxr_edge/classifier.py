"""Classifier: decode -> preprocess -> backend -> softmax -> results, pipelined.

Decode/preprocess of the next batch runs in a thread pool while the backend works on the current
one (Pillow, pydicom and numpy release the GIL for most of it); OpenVINO batches go through
asynchronous infer requests. A bad input becomes an error result and never stops the batch.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from .backends import load_best
from .backends.base import BackendError
from .decode import DecodeError, decode, estimate_bytes
from .inflight import DEFAULT_DECODE_TIMEOUT, MAX_BATCH_SIZE, DecodePool, budget_from_env
from .inputs import describe as _describe
from .package import ModelPackage
from .postprocess import DISCLAIMER, Result, softmax  # noqa: F401 (DISCLAIMER re-exported)
from .preprocess import preprocess


class Classifier:
    """A model package opened on one backend: decode -> preprocess -> infer -> `Result`, in input order.

    Prefer `load()`. batch_size: 1..MAX_BATCH_SIZE; decode_budget: bytes of decode working set in
    flight; decode_timeout: seconds per input (inflight.py); operating_point: see guard.py; options:
    passed to the backend (see each Backend). A bad input becomes an error `Result`, never an exception.

    Raises:
        ValueError: batch_size, decode_budget or decode_timeout out of range.
        BackendError, PackageError: no usable backend, or its output width differs from the classes.
    """
    def __init__(self, package: ModelPackage, backend="auto", precision="auto", batch_size: int = 8,
                 threads: int | None = None, decode_workers: int | None = None, options: dict | None = None,
                 decode_budget: int | None = None, decode_timeout: float | None = None,
                 operating_point: str | None = None):
        # operating_point: a name from model.json "operating_points" (e.g. "sensitive"), see guard.py.
        # decode_budget: bytes of decode working set in flight (default 1 GiB, or CXR_EDGE_DECODE_MEMORY_MB);
        # decode_timeout: seconds one input may decode before it becomes an error row (default 60). inflight.py.
        if not 1 <= int(batch_size) <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size}")
        self.decode_budget = int(decode_budget) if decode_budget else budget_from_env()
        self.decode_timeout = float(decode_timeout) if decode_timeout else DEFAULT_DECODE_TIMEOUT
        if self.decode_budget <= 0 or not self.decode_timeout > 0:
            raise ValueError(f"decode_budget and decode_timeout must be > 0, got {decode_budget}, {decode_timeout}")
        self.package = package
        self.classes = list(package.classes)
        self.spec = package.preprocess
        self.batch_size = int(batch_size)
        from .guard import Guard
        self.guard = Guard(package, operating_point)   # calibration, input guard, operating point (guard.py)
        self.backend, self.why = load_best(package, backend, precision, threads, options)
        self.guard.use_precision(self.backend.precision)   # its features, its threshold
        self._check_output_width()
        self.decode_workers = decode_workers or max(2, min(4, os.cpu_count() or 2))
        # predict_one: one large image's resample on up to this many cores; its standing decode threads
        self.split_threads = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else (os.cpu_count() or 1)))
        self._single: DecodePool | None = None
        self._closed = False
        self._single_lock = threading.Lock()
        self._cam = None
        self._cam_lock = threading.Lock()
        from .nearties import threshold as _near_tie_threshold
        self.uncertain_below = _near_tie_threshold(self.backend.artifact, self.backend.name, self.backend.precision)

    def _check_output_width(self):
        """One zero image through the loaded backend: its logits must have one column per class of
        model.json (2 names for a 3-output model would otherwise give probabilities that do not sum
        to 1, or crash when the unnamed output wins); with a Mahalanobis input guard, its feature
        map must have the guard's channels. Costs one batch-1 inference at load.

        Raises:
            PackageError: the output width differs from the class count, or the guard's feature map
                is missing or of another width (the package is wrong).
            BackendError: the backend cannot run the test image.
        """
        from .package import PackageError
        c, s = self.spec.channels, self.spec.size
        try:
            out = self.backend.infer(np.zeros((1, c, s, s), np.float32), features=self.guard.needs_features)
            logits = out["logits"]
        except Exception as e:
            self.backend.close()
            raise BackendError(f"{self.backend.describe()}: could not run a test image at load: {e}") from None
        try:   # a Mahalanobis input guard needs the feature map it was fitted on (guard.py)
            self.guard.check_features(out.get("features"), f"{self.package.root}: {self.backend.describe()}")
        except PackageError:
            self.backend.close()
            raise
        shape, k = tuple(np.shape(logits)), len(self.classes)
        if shape != (1, k):
            self.backend.close()
            width = shape[-1] if len(shape) == 2 else shape
            raise PackageError(f"{self.package.root}: classes: model.json lists {k} classes {self.classes} but "
                               f"{self.backend.artifact.file} outputs {width} logits per image")

    @property
    def backend_name(self) -> str:
        """The running backend's name, e.g. "openvino"."""
        return self.backend.name

    @property
    def precision(self) -> str:
        """The running precision, e.g. "int8"."""
        return self.backend.precision

    # -- single steps, shared by every path --------------------------------------------------
    def _prepare(self, item, threads: int = 1):
        """(tensor, Decoded) or (None, error message): never raises for a bad input. threads: decode's
        lookup table pass and the resample of one large image on that many threads (same values)."""
        try:
            d = decode(item, min_side=self.spec.decode_hint(), threads=threads)
            tensor = preprocess(d.pixels, self.spec, threads=threads)
            # the full-resolution pixels are not needed any more (only their shape, for CAM): drop them
            # now, so that results waiting for a batch hold model tensors, not images (inflight.py)
            d.pixels = np.broadcast_to(np.float32(0), d.pixels.shape)
            return tensor, d
        except DecodeError as e:
            return None, str(e)
        except MemoryError:
            return None, f"{_describe(item)}: out of memory while decoding"
        except Exception as e:  # a decoder bug on one file must not cost the others their results
            return None, f"{_describe(item)}: {type(e).__name__}: {e}"

    def _finish(self, items, prepared, out, explain: bool) -> list[Result]:
        results, k = [], 0
        probs = self.guard.probabilities(out["logits"]) if out is not None else None
        if probs is not None:
            labels = self.guard.labels(probs)
            ood = self.guard.ood_scores(out["logits"], out.get("features"))   # the whole batch at once
            from .nearties import flag
            margins, uncertain = flag(probs, self.uncertain_below)
        for item, (tensor, d) in zip(items, prepared):
            if tensor is None:
                results.append(Result(_describe(item), error=d, backend=self.backend.name, precision=self.precision))
                continue
            p = probs[k]
            r = Result(_describe(item),
                       label=self.classes[int(labels[k])],
                       probabilities={c: float(v) for c, v in zip(self.classes, p)},
                       backend=self.backend.name, precision=self.precision, original_size=d.original_size,
                       margin=float(margins[k]), uncertain=uncertain[k])
            r.warnings = list(d.meta.get("warnings", ()))
            r.warnings += self.guard.warnings(out["logits"][k], d.meta, r.source,
                                              score=None if ood is None else float(ood[k]))
            if explain:
                from .cam import oriented_size
                engine = self.cam_engine()
                cls = engine.class_index(explain)
                r.cam = engine.heatmap(out, k, int(labels[k]) if cls is None else cls, oriented_size(d))
                r.cam_method = engine.method
            results.append(r)
            k += 1
        return results

    def cam_engine(self):
        """The CamEngine for this package and backend, created on first use (thread-safe); CamUnavailable if none."""
        with self._cam_lock:
            if self._cam is None:
                from .cam import CamEngine
                self._cam = CamEngine(self.package, self.backend)
            return self._cam

    # -- public API ------------------------------------------------------------------------------
    def predict(self, inputs, explain: bool = False) -> list[Result]:
        """A list of inputs (paths, bytes, PIL images, arrays) -> one Result each, in order."""
        if isinstance(inputs, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image)) or not isinstance(inputs, Iterable):
            inputs = [inputs]
        return list(self.stream(inputs, explain=explain))

    def predict_one(self, item, explain: bool = False) -> Result:
        """One input, lowest latency: decoded on this classifier's standing decode threads (none to
        start per call) within `decode_timeout`, a large image's lookup and resample split over the
        cores (`split_threads`), then one batch-1 inference on the backend's one-input engine
        (`Backend.infer_one_async`; OpenVINO: a LATENCY compilation, made on first use). A bad or hung
        input gives an error Result; a bad `explain` raises, as in `predict` (ValueError, CamUnavailable)."""
        self._check_open()
        if explain:   # checked before any decoding, not reported as an inference failure of this input
            self.cam_engine().class_index(explain)
        pool = self._one_pool()
        task = pool.submit(self._prepare_split, item, estimate_bytes(item))
        try:
            prepared = pool.wait(task)
        except (TimeoutError, RuntimeError) as e:    # a hung decoder: an error result, the classifier goes on
            prepared = (None, f"{_describe(item)}: {e}")
        out = None
        if prepared[0] is not None:
            try:
                out = self._submit(prepared[0][None], explain, one=True).result()
            except Exception as e:
                return Result(_describe(item), error=f"{_describe(item)}: inference failed on "
                              f"{self.backend.describe()}: {e}", backend=self.backend.name, precision=self.precision)
        return self._finish([item], [prepared], out, explain)[0]

    def _prepare_split(self, item):
        return self._prepare(item, self.split_threads)

    def _one_pool(self) -> DecodePool:
        with self._single_lock:
            if self._single is None:
                self._single = DecodePool(self.decode_workers, self.decode_budget, self.decode_timeout,
                                          name="cxr-predict-one")
            return self._single

    def stream(self, inputs: Iterable, explain: bool = False) -> Iterator[Result]:
        """Results in input order as batches complete; memory stays bounded for any input length.
        Raises BackendError once the classifier is closed."""
        self._check_open()
        pool = DecodePool(self.decode_workers, self.decode_budget, self.decode_timeout)
        try:
            prep_q: deque = deque()          # (item, task) in input order, bounded lookahead
            infer_q: deque = deque()         # (items, prepared, handle) submitted to the backend
            it = iter(inputs)
            # tensors waiting for a batch count against the byte budget too (never less than one batch)
            tensor_bytes = 4 * self.spec.channels * self.spec.size * self.spec.size
            lookahead = max(self.batch_size + 1, min(self.batch_size * 3, self.decode_budget // tensor_bytes))
            exhausted = False

            def fill():
                nonlocal exhausted
                while not exhausted and len(prep_q) < lookahead:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        return
                    prep_q.append((item, pool.submit(self._prepare, item, estimate_bytes(item))))

            fill()
            while prep_q or infer_q:
                if prep_q:
                    items, prepared = [], []
                    while prep_q and len(items) < self.batch_size:
                        item, task = prep_q.popleft()
                        items.append(item)
                        try:
                            prepared.append(pool.wait(task))
                        except (TimeoutError, RuntimeError) as e:   # a hung decoder: an error row, the run goes on
                            prepared.append((None, f"{_describe(item)}: {e}"))
                        fill()
                    tensors = [t for t, _ in prepared if t is not None]
                    handle = None
                    if tensors:
                        batch = np.stack(tensors)
                        handle = self._submit(batch, explain)
                    infer_q.append((items, prepared, handle))
                # keep one batch in flight while the next is decoded; drain at the end
                while infer_q and (len(infer_q) > 1 or not prep_q):
                    items, prepared, handle = infer_q.popleft()
                    try:
                        out = handle.result() if handle is not None else None
                    except Exception as e:
                        msg = f"inference failed on {self.backend.describe()}: {e}"
                        yield from (Result(_describe(i), error=f"{_describe(i)}: {msg}", backend=self.backend.name,
                                           precision=self.precision) for i in items)
                        continue
                    yield from self._finish(items, prepared, out, explain)
        finally:
            pool.close()

    def _submit(self, batch, explain, one: bool = False):
        if explain:
            engine = self.cam_engine()       # fails here, before any inference, if no CAM is possible
            engine.class_index(explain)      # explain=True (predicted class) or a class name
            if self.backend.name == "torch":
                done: Future = Future()
                done.set_result(engine.torch_outputs(batch))
                return done
        # the feature map costs no extra compute (the head pools it anyway), only its copy out
        features = bool(explain) or self.guard.needs_features
        if one:   # predict_one: one input waiting alone, on the backend's lowest-latency engine
            return self.backend.infer_one_async(batch, features=features)
        return self.backend.infer_async(batch, features=features)

    def close(self):
        """Close the backend and predict_one's decode threads (also on leaving a `with` block); using the
        classifier afterwards raises BackendError."""
        self._closed = True
        if self._single is not None:
            self._single.close()
            self._single = None
        self.backend.close()

    def _check_open(self):
        if self._closed:
            raise BackendError(f"{self.backend.describe()}: the classifier is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(model=None, backend: str = "auto", precision: str = "auto", batch_size: int = 8,
         threads: int | None = None, options: dict | None = None, decode_budget: int | None = None,
         decode_timeout: float | None = None, operating_point: str | None = None) -> Classifier:
    """Open a model package (None: the embedded default model) on the fastest usable backend.
    decode_budget (bytes) and decode_timeout (seconds): see Classifier and inflight.py.
    operating_point: a name from the package's model.json "operating_points" (e.g. "sensitive"):
    normal only when the calibrated p(normal) reaches its threshold (guard.py); None: argmax."""
    pkg = model if isinstance(model, ModelPackage) else ModelPackage.read(model)
    return Classifier(pkg, backend, precision, batch_size, threads, options=options,
                      decode_budget=decode_budget, decode_timeout=decode_timeout, operating_point=operating_point)
