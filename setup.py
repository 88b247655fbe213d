"""megatron_mole: sparse Mixtures of LoRA Experts for Megatron-core.

Install torch first (``pip install torch==2.13.0`` on CPU machines), then
``pip install -e .[test]``: an open torch range may otherwise pull a CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_mole",
    version="0.1.0",
    description="Mixture of LoRA Experts (MoLE) adapters for Megatron-core: TP/PP/EP, converters, training",
    packages=find_packages(include=["megatron_mole", "megatron_mole.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # Tested: 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12); README "Supported versions".
        "megatron-core>=0.16,<0.20",
        "transformers>=4.45",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
        # images of the multimodal (LLaVA) data and quickstart, through the base's image processor
        "pillow",
        "matplotlib",  # megatron-mole analyze plots
    ],
    extras_require={
        "test": ["pytest", "peft", "datasets"],
        # Hugging Face datasets (Arrow/Parquet, local files) as input to `megatron-mole preprocess`.
        "data": ["datasets"],
        # NVIDIA apex and Transformer Engine are optional GPU accelerators. They are
        # not on PyPI under those names (PyPI's "apex" is an unrelated web package):
        # build NVIDIA apex from its repository and install transformer-engine[pytorch]
        # following NVIDIA's instructions. Nothing in megatron_mole requires them.
        "gpu": [],
    },
    entry_points={"console_scripts": ["megatron-mole=megatron_mole.cli:main"]},
)
