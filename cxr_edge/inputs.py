"""Inputs: turn what a user names (files, folders) into the list of items to classify."""
from __future__ import annotations

import os
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
    return f"<{type(item).__name__}>"
