"""export/: trained checkpoint -> parity-gated model package.

Imported lazily: the CLI registers `cxr-edge export` through this package, and `classify`
must not pay for importing torch."""


def __getattr__(name):
    if name in ("export_checkpoint", "GateFailed"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["export_checkpoint", "GateFailed"]
