"""Evaluation and generation on trained STEM models (checkpoints or exports).

- `loading`: `--model PATH` (an export directory or a checkpoint / save directory) -> a
  plain-PyTorch model, its tokenizer and context length; shared by every inference CLI.
- `documents`, `windows`, `perplexity`, `megatron_scorer`: `stem-eval ppl`.
- `kv_model`, `rows`, `generate`: `stem-generate` (KV cache; STEM tables on the device or in host
  memory behind `stem.host_store.HostRowStore`).
- `niah`: `stem-eval niah`, passkey retrieval at several depths and context lengths.
"""
