"""Classifier: decode -> preprocess -> backend -> softmax -> results, pipelined.

Decode/preprocess of the next batch runs in a thread pool while the backend works on the current
one (Pillow, pydicom and numpy release the GIL for most of it); OpenVINO batches go through
asynchronous infer requests. A bad input becomes an error result and never stops the batch.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from .backends import load_best
from .decode import DecodeError, decode
from .inputs import describe as _describe
from .package import ModelPackage
from .postprocess import DISCLAIMER, Result, softmax  # noqa: F401 (DISCLAIMER re-exported)
from .preprocess import preprocess


class Classifier:
    def __init__(self, package: ModelPackage, backend="auto", precision="auto", batch_size: int = 8,
                 threads: int | None = None, decode_workers: int | None = None, options: dict | None = None):
        self.package = package
        self.classes = list(package.classes)
        self.spec = package.preprocess
        self.batch_size = max(1, int(batch_size))
        self.backend, self.why = load_best(package, backend, precision, threads, options)
        self._check_output_width()
        self.decode_workers = decode_workers or max(2, min(4, os.cpu_count() or 2))
        self._cam = None
        self._cam_lock = threading.Lock()
        from .nearties import threshold as _near_tie_threshold
        self.uncertain_below = _near_tie_threshold(self.backend.artifact, self.backend.name, self.backend.precision)

    def _check_output_width(self):
        """One zero image through the loaded backend: its logits must have one column per class of
        model.json (2 names for a 3-output model would otherwise give probabilities that do not sum
        to 1, or crash when the unnamed output wins). Costs one batch-1 inference at load.

        Raises:
            PackageError: the output width differs from the class count (the package is wrong).
            BackendError: the backend cannot run the test image.
        """
        from .backends.base import BackendError
        from .package import PackageError
        c, s = self.spec.channels, self.spec.size
        try:
            logits = self.backend.infer(np.zeros((1, c, s, s), np.float32))["logits"]
        except Exception as e:
            self.backend.close()
            raise BackendError(f"{self.backend.describe()}: could not run a test image at load: {e}") from None
        shape, k = tuple(np.shape(logits)), len(self.classes)
        if shape != (1, k):
            self.backend.close()
            width = shape[-1] if len(shape) == 2 else shape
            raise PackageError(f"{self.package.root}: classes: model.json lists {k} classes {self.classes} but "
                               f"{self.backend.artifact.file} outputs {width} logits per image")

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def precision(self) -> str:
        return self.backend.precision

    # -- single steps, shared by every path --------------------------------------------------
    def _prepare(self, item):
        """(tensor, Decoded) or (None, error message): never raises for a bad input."""
        try:
            d = decode(item, min_side=self.spec.decode_hint())
            return preprocess(d.pixels, self.spec), d
        except DecodeError as e:
            return None, str(e)
        except MemoryError:
            return None, f"{_describe(item)}: out of memory while decoding"
        except Exception as e:  # a decoder bug on one file must not cost the others their results
            return None, f"{_describe(item)}: {type(e).__name__}: {e}"

    def _finish(self, items, prepared, out, explain: bool) -> list[Result]:
        results, k = [], 0
        probs = softmax(out["logits"]) if out is not None else None
        if probs is not None:
            from .nearties import flag
            margins, uncertain = flag(probs, self.uncertain_below)
        for item, (tensor, d) in zip(items, prepared):
            if tensor is None:
                results.append(Result(_describe(item), error=d, backend=self.backend.name, precision=self.precision))
                continue
            p = probs[k]
            r = Result(_describe(item),
                       label=self.classes[int(p.argmax())],
                       probabilities={c: float(v) for c, v in zip(self.classes, p)},
                       backend=self.backend.name, precision=self.precision, original_size=d.original_size,
                       margin=float(margins[k]), uncertain=uncertain[k])
            if explain:
                from .cam import oriented_size
                engine = self.cam_engine()
                cls = engine.class_index(explain)
                r.cam = engine.heatmap(out, k, int(p.argmax()) if cls is None else cls, oriented_size(d))
                r.cam_method = engine.method
            results.append(r)
            k += 1
        return results

    def cam_engine(self):
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
        """One input, decoded in the calling thread: no pool to start, lowest latency."""
        prepared = self._prepare(item)
        out = None
        if prepared[0] is not None:
            try:
                out = self._submit(prepared[0][None], explain).result()
            except Exception as e:
                return Result(_describe(item), error=f"{_describe(item)}: inference failed on "
                              f"{self.backend.describe()}: {e}", backend=self.backend.name, precision=self.precision)
        return self._finish([item], [prepared], out, explain)[0]

    def stream(self, inputs: Iterable, explain: bool = False) -> Iterator[Result]:
        """Results in input order as batches complete; memory stays bounded for any input length."""
        features = explain and self.backend.name != "torch"
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="cxr-decode") as pool:
            prep_q: deque = deque()          # (item, future) in input order, bounded lookahead
            infer_q: deque = deque()         # (items, prepared, handle) submitted to the backend
            it = iter(inputs)
            lookahead = self.batch_size * 3
            exhausted = False

            def fill():
                nonlocal exhausted
                while not exhausted and len(prep_q) < lookahead:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        return
                    prep_q.append((item, pool.submit(self._prepare, item)))

            fill()
            while prep_q or infer_q:
                if prep_q:
                    items, prepared = [], []
                    while prep_q and len(items) < self.batch_size:
                        item, fut = prep_q.popleft()
                        items.append(item)
                        prepared.append(fut.result())
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

    def _submit(self, batch, explain):
        if explain:
            engine = self.cam_engine()       # fails here, before any inference, if no CAM is possible
            engine.class_index(explain)      # explain=True (predicted class) or a class name
            if self.backend.name == "torch":
                done: Future = Future()
                done.set_result(engine.torch_outputs(batch))
                return done
        return self.backend.infer_async(batch, features=bool(explain))

    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(model=None, backend: str = "auto", precision: str = "auto", batch_size: int = 8,
         threads: int | None = None, options: dict | None = None) -> Classifier:
    """Open a model package (None: the embedded default model) on the fastest usable backend."""
    pkg = model if isinstance(model, ModelPackage) else ModelPackage.read(model)
    return Classifier(pkg, backend, precision, batch_size, threads, options=options)
