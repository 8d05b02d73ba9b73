"""export/: trained checkpoint -> parity-gated model package.

Imported lazily: the CLI registers `cxr-edge export` through this package, and `classify`
must not pay for importing torch."""


def __getattr__(name):
    if name in ("export_checkpoint", "GateFailed"):
        from . import pipeline
        return getattr(pipeline, name)
    if name in _SETTINGS:
        from . import settings
        return getattr(settings, name)
    raise AttributeError(name)


_SETTINGS = ("ExportSettings", "GateSettings", "Int8Settings", "ReferenceSettings")
__all__ = ["ExportSettings", "GateFailed", "GateSettings", "Int8Settings", "ReferenceSettings", "export_checkpoint"]
