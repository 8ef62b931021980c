"""stem_megatron: distributed STEM pretraining on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="stem_megatron",
    version="0.1.0",
    description="Scaling Transformers with Embedding Modules (STEM) on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["stem_megatron", "stem_megatron.*", "data_tools", "data_tools.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tensorboard>=2.14",
        "psutil>=5.9",  # dist_checkpointing's forked writer hangs without it
        "tokenizers>=0.15",
        "tiktoken>=0.6",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4",
    ],
    extras_require={
        # GPU clusters / NGC containers. `apex` here means NVIDIA's apex, which is not on PyPI
        # (build it from its repository); never the unrelated PyPI package named `apex`.
        "te": ["transformer-engine[pytorch]>=1.9"],
        "dev": ["pytest>=8", "ruff>=0.5"],
        "plot": ["matplotlib>=3.7"],  # benchmark figures (make bench-cache)
    },
    entry_points={
        "console_scripts": [
            "stem-train=stem_megatron.train:main",
            "stem-reshard=stem_megatron.reshard:main",
            "stem-export=stem_megatron.export:main",
            "stem-preprocess=data_tools.preprocess:main",
            "stem-train-tokenizer=data_tools.train_tokenizer:main",
            "stem-sample-data=data_tools.sample_corpus:main",
        ]
    },
)
