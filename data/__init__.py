"""Data preparation and loaders (installed as irepa.data). Loader interface: data/memory.py.

Imported as the top-level `data` (the checkout's root on sys.path), this folder steps
aside for a package that owns that name, or fails as if it were not there (irepa/shadowing.py).
"""
__all__ = ["TensorLoader", "MemmapLoader", "FFCVLoader", "build_loader", "ffcv_available", "read_manifest",
           "check_manifest", "fp8_cosine_fidelity", "prepare", "bad_records", "scan_dataset"]

if __name__ != "irepa.data":
    from irepa.shadowing import yield_name

    yield_name(__name__, __file__)
else:
    from .format import bad_records, check_manifest, fp8_cosine_fidelity, read_manifest, scan_dataset
    from .loader import FFCVLoader, MemmapLoader, build_loader, ffcv_available
    from .memory import TensorLoader
    from .prepare import prepare
