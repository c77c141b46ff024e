"""Data preparation and loaders (installed as irepa.data). Loader interface: data/memory.py."""
from .format import check_manifest, fp8_cosine_fidelity, read_manifest
from .loader import FFCVLoader, MemmapLoader, build_loader, ffcv_available
from .memory import TensorLoader
from .prepare import prepare

__all__ = ["TensorLoader", "MemmapLoader", "FFCVLoader", "build_loader", "ffcv_available", "read_manifest",
           "check_manifest", "fp8_cosine_fidelity", "prepare"]
