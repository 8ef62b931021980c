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
        # The two tested lines (README "Supported megatron-core", stem_megatron/megatron_version.py):
        # 0.16.1 on Python < 3.12 (`make setup`), 0.19.x on Python >= 3.12 (`make setup-py312`; 0.19
        # ships cp312 wheels only). Anything else stops at start-up unless STEM_ALLOW_UNTESTED_MEGATRON=1.
        "megatron-core>=0.16.1,<0.17; python_version < '3.12'",
        "megatron-core>=0.19.2,<0.20; python_version >= '3.12'",
        "numpy>=1.24",
        "packaging>=23",  # megatron_version.py compares megatron-core releases (megatron-core needs it too)
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
        "plot": ["matplotlib>=3.7"],  # PNGs: stem-eval niah heatmap, stem-analyze, benchmarks.scale_model
        # Hugging Face interop (docs/interop.md): exports that transformers loads, stem-import.
        "hf": ["transformers>=5.0,<6"],
        # lm-eval-harness on exports (its `hf` model needs transformers + accelerate).
        "eval": ["lm-eval[hf]>=0.4.9,<0.5", "transformers>=5.0,<6"],
        # `make setup` installs dev: the default suite covers interop, lm-eval and the PNG writers.
        "dev": ["pytest>=8", "ruff>=0.5", "matplotlib>=3.7", "transformers>=5.0,<6", "lm-eval[hf]>=0.4.9,<0.5"],
    },
    entry_points={
        "console_scripts": [
            "stem-train=stem_megatron.cli.train:main",
            "stem-reshard=stem_megatron.cli.reshard:main",
            "stem-export=stem_megatron.cli.export:main",
            "stem-eval=stem_megatron.cli.eval:main",
            "stem-generate=stem_megatron.cli.generate:main",
            "stem-import=stem_megatron.cli.import_hf:main",
            "stem-edit=stem_megatron.cli.edit:main",
            "stem-analyze=stem_megatron.cli.analyze:main",
            "stem-preprocess=stem_megatron.cli.preprocess:main",
            "stem-merge=stem_megatron.cli.merge:main",
            "stem-train-tokenizer=stem_megatron.cli.train_tokenizer:main",
            "stem-sample-data=stem_megatron.cli.sample_data:main",
        ]
    },
)
