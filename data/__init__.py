"""Data preparation and loaders (installed as irepa.data). Loader interface: data/memory.py.

Imported under another name (a top-level `data` found on sys.path from the repo root,
as other libraries probe for that name) the package defines nothing.
"""
__all__ = ["TensorLoader", "MemmapLoader", "FFCVLoader", "build_loader", "ffcv_available", "read_manifest",
           "check_manifest", "fp8_cosine_fidelity", "prepare", "bad_records", "scan_dataset"]

if __name__ != "irepa.data":
    __all__ = []
else:
    from .format import bad_records, check_manifest, fp8_cosine_fidelity, read_manifest, scan_dataset
    from .loader import FFCVLoader, MemmapLoader, build_loader, ffcv_available
    from .memory import TensorLoader
    from .prepare import prepare
