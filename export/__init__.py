"""export/: trained checkpoint -> parity-gated model package."""
from .pipeline import GateFailed, export_checkpoint

__all__ = ["export_checkpoint", "GateFailed"]
