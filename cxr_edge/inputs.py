"""Inputs: turn what a user names (files, folders) into the list of items to classify."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}


def expand_inputs(inputs, recursive: bool = False) -> list[str]:
    """Paths to classify, in a stable order.

    Files named explicitly are always kept (a missing one becomes an error row later); folders
    contribute image-like files: a known suffix, or none at all (DICOM files exported from a
    DICOMDIR usually have no extension). Hidden files are skipped.

    Args:
        inputs: file or folder paths (str or os.PathLike).
        recursive: descend into sub-folders.
    Returns:
        the paths as strings, each folder's files sorted by name.
    """
    out = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = sorted(p.rglob("*") if recursive else p.iterdir())
            out += [str(f) for f in files if f.is_file() and not f.name.startswith(".")
                    and (f.suffix.lower() in IMAGE_SUFFIXES or f.suffix == "")]
        else:
            out.append(str(p))
    return out


def describe(item) -> str:
    """How an input is named in results and messages: its path, or `<type>` for in-memory data."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, Pixels):
        return item.name
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if type(item).__name__ == "ndarray":
        return "<array>"
    if hasattr(item, "getpixel"):      # a PIL image, without importing Pillow here
        return "<PIL image>"
    return f"<{type(item).__name__}>"


@dataclass(frozen=True)
class Pixels:
    """A raw pixel buffer with what a bare array cannot say about itself.

    Pass it wherever an input is accepted (`Classifier.predict([...])`, `predict_one`, `decode`).

    Attributes:
        array: (H, W) uint8, (H, W) uint16 (either byte order), or (H, W) float in 0..1;
            (H, W, 3) RGB is converted with ITU-R BT.601 luma.
        bits_stored: significant bits of uint16 pixels (DICOM Bits Stored (0028,0101), e.g. 12):
            values are scaled by 1 / (2**bits_stored - 1). Required for uint16.
        monochrome1: True when the minimum value is white (DICOM Photometric Interpretation
            MONOCHROME1, PS3.3 C.7.6.3.1.2): the image is inverted after scaling.
        name: how the input is named in results and errors.
    """
    array: object
    bits_stored: int | None = None
    monochrome1: bool = False
    name: str = "<array>"
