"""stem_megatron: STEM (Scaling Transformers with Embedding Modules) pretraining on megatron-core.

The library never imports `launch/`, `data_tools/` or `configs/`.
"""

__version__ = "0.1.0"
