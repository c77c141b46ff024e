from setuptools import setup

setup(
    name="irepa",
    version="0.1.0",
    description="Fast, faithful trainer for SiT/JiT diffusion transformers with REPA/iREPA alignment",
    python_requires=">=3.10",
    packages=["irepa", "irepa.models", "irepa.recipes", "irepa.train", "irepa.encoders", "irepa.metrics",
              "irepa.analysis", "irepa.kernels", "irepa.data"],
    package_dir={"irepa": "irepa", "irepa.kernels": "kernels", "irepa.data": "data"},
    install_requires=[
        "torch>=2.5", "numpy", "scipy", "safetensors", "fire", "tensorboard", "tqdm", "pillow",
        "scikit-learn", "scikit-image",
    ],
    extras_require={
        "gpu": ["triton>=3.0", "flash-attn", "xformers"],
        "data": ["ffcv", "diffusers"],
        "encoders": ["transformers>=5.0"],
        "test": ["pytest", "triton>=3.0"],
    },
)
