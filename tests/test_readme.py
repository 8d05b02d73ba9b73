"""The README's Python example runs as written (on generated inputs named as in the README)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"


def _use_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Use"):]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README '## Use' has no python example"
    return m.group(1)


def test_readme_use_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 80), dtype=np.uint8)).save("a.png")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", 64, 72
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (64, 72), dtype=np.uint16).tobytes()
    ds.save_as("b.dcm", enforce_file_format=True)
    scope = {"pixels_uint16_array": rng.integers(0, 4096, (80, 64), dtype=np.uint16).astype(">u2"),
             "huge_list_of_paths": ["a.png"] * 3}
    exec(compile(_use_snippet(), str(README), "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith(("a.png", "b.dcm", "<array>"))]
    assert [r.split()[:2] for r in rows[:3]] == [["a.png", "ok"], ["b.dcm", "ok"], ["<array>", "ok"]], out
    assert len(rows) == 6          # 3 from predict, 3 from stream
