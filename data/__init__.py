"""Data preparation and loaders (installed as irepa.data). Loader interface: data/memory.py.

Imported under another name (a top-level `data` found on sys.path from the repo root,
as other libraries probe for that name) the package defines nothing.
"""
__all__ = ["TensorLoader", "MemmapLoader", "FFCVLoader", "build_loader", "ffcv_available", "read_manifest",
           "check_manifest", "fp8_cosine_fidelity", "prepare"]

if __name__ != "irepa.data":
    __all__ = []
else:
    from .format import check_manifest, fp8_cosine_fidelity, read_manifest
    from .loader import FFCVLoader, MemmapLoader, build_loader, ffcv_available
    from .memory import TensorLoader
    from .prepare import prepare
