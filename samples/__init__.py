"""The 16 sample chest X-rays shipped with cxr-edge (Kermany et al., CC BY 4.0; see ATTRIBUTION.md).

Installed as `cxr_edge.samples`, so an edge install can run `cxr-edge bench` without a checkout."""
from pathlib import Path

DIR = Path(__file__).resolve().parent
