"""The runtime's only door into train/ (the architecture registry), for the torch reference and
Grad-CAM. Imported lazily: an edge install without torch never reaches it."""
from __future__ import annotations


def build_network(architecture: dict):
    from cxr_edge.train.models import build
    return build(architecture)
