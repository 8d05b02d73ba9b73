"""Labelled image sets for export and bench: find the items of a data directory or split file, and
decode + preprocess them exactly as the runtime does.

Export keeps a set in memory (`load_images` -> `LabelledSet`); bench streams the same tensors to a
file. Both go through `iter_tensors`, so a parity set means the same thing in model.json and in a
bench report. Items are Sample-like objects (`.path`, `.label`, optional `.source`) or plain paths.

Runs in an edge install without torch: the training package (cxr_edge.train) is imported only where
a training layout or split file has to be read, and a missing one falls back to a plain folder.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode import DecodeError, decode
from .preprocess import PreprocessSpec, preprocess


@dataclass
class LabelledSet:
    """Preprocessed images with their class indices, in memory.

    Attributes:
        tensors: (N, C, size, size) float32, as `preprocess` returns them.
        labels: (N,) int class indices into the classes the set was loaded with; -1 = no label.
        paths: N str, the file of each image.
        skipped: one message (str) per unreadable file left out.
        sources: N str, the data source of each image ("" when unknown; may be empty for sets
            built from tensors alone).
        name: what model.json says the set is (never a host path).
    """
    tensors: np.ndarray
    labels: np.ndarray
    paths: list
    skipped: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    name: str = "given"


def item_fields(item) -> tuple[str, str | None, str]:
    """(path, label or None, source or "") of a Sample-like object or a plain path (str/PathLike)."""
    path = getattr(item, "path", item)
    return str(path), getattr(item, "label", None), str(getattr(item, "source", "") or "")


def class_index(label: str | None, classes: list | None) -> int:
    """Index of `label` in `classes`; -1 when there are no classes, no label, or a label outside them."""
    if classes is None or label is None or label not in classes:
        return -1
    return classes.index(label)


def iter_tensors(items: Iterable, spec: PreprocessSpec, skipped: list,
                 errors: tuple[type[Exception], ...] = (DecodeError,)) -> Iterator[tuple[object, np.ndarray]]:
    """Decode + preprocess each item exactly as the runtime does, lazily, in order.

    Args:
        items: Sample-like objects or paths (see `item_fields`).
        spec: the package's preprocessing spec.
        skipped: a list the message of each failure in `errors` is appended to (the item is left out).
        errors: exception types that mean "leave this file out"; others propagate. decode raises
            only DecodeError; preprocess raises ValueError for images under 2 x 2 pixels.
    Yields:
        (item, tensor): the item as given and its (C, size, size) float32 model input.
    """
    for it in items:
        try:
            x = preprocess(decode(item_fields(it)[0], min_side=spec.decode_hint()).pixels, spec)
        except errors as e:
            skipped.append(str(e))
            continue
        yield it, x


def load_images(items: Iterable, spec: PreprocessSpec, classes: list | None = None,
                limit: int | None = None) -> LabelledSet:
    """Decode + preprocess a labelled set into memory.

    Args:
        items: Sample-like objects (path, label[, source]) or plain paths.
        spec: the package's preprocessing spec.
        classes: the model's class names; labels become indices into it, and labelled items whose
            label is not among them are left out (not counted as skipped). None: every label -1.
        limit: stop after this many usable images (the first ones, in order); None or 0: all.
    Returns:
        a LabelledSet; unreadable files (DecodeError) and images preprocess refuses (ValueError,
        e.g. smaller than 2x2) are left out and listed in `skipped`.
    Raises:
        ValueError: no usable image at all.
    """
    if classes is not None:  # images of classes the model does not know are not part of its set
        items = (it for it in items if item_fields(it)[1] in (None, *classes))
    tensors, kept, skipped = [], [], []
    for it, x in iter_tensors(items, spec, skipped, errors=(DecodeError, ValueError)):
        tensors.append(x)
        kept.append(item_fields(it))
        if limit and len(tensors) >= limit:
            break
    if not tensors:
        raise ValueError("no usable images in the given set")
    return LabelledSet(np.stack(tensors), np.array([class_index(label, classes) for _, label, _ in kept]),
                       [p for p, _, _ in kept], skipped, [s for _, _, s in kept])


def items_in_dir(root) -> list:
    """The items of a data directory: Samples of any layout cxr_edge.train.data reads (manifest.csv,
    class folders, Kermany, ...), else every image file below it as a plain path (no label).

    Returns a possibly empty list. Raises FileNotFoundError when `root` is not a directory.
    """
    p = Path(root)
    if not p.is_dir():
        raise FileNotFoundError(f"{root}: data directory not found")
    # any failure (no training package in this install, no layout train/data knows, a layout with
    # missing pieces) means: treat it as a plain folder of images
    try:
        from cxr_edge.train.data import load_dataset
        items = load_dataset(p)
    except Exception:  # noqa: BLE001 - see above
        items = None
    if not items:
        from .inputs import expand_inputs
        items = expand_inputs([str(p)], recursive=True)
    return items


def resolve_set(spec_str: str, part_default: str) -> list:
    """The items a set argument names: DIR (see `items_in_dir`) or RUN/split.json[:part].

    part: one part of the split ("test"), or several joined by "+" ("val+test": their items in that
    order); `part_default` when none is given. Returns Samples (or plain paths for a plain folder).
    Raises FileNotFoundError when the path is neither a directory nor a .json file, KeyError when
    the split has no such part.
    """
    has_part = spec_str.count(":") == 1 and not Path(spec_str).exists()
    path, _, part = spec_str.partition(":") if has_part else (spec_str, "", "")
    p = Path(path)
    if p.suffix == ".json":
        from cxr_edge.train.experiment import read_split
        return [s for pt in (part or part_default).split("+") for s in read_split(p, pt)]
    if p.is_dir():
        return items_in_dir(p)
    raise FileNotFoundError(f"{spec_str}: not a directory or split.json")
