"""stem_megatron: STEM (Scaling Transformers with Embedding Modules) pretraining on megatron-core.

The library never imports `launch/`, `data_tools/`, `configs/` or `stem_megatron.cli`; the commands
(`stem_megatron/cli/`, one module per console script) are the only part that imports `data_tools`
(tests/test_import_rules.py).
"""

__version__ = "0.1.0"
