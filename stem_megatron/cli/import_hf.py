"""`stem-import`: the command line of `stem_megatron.hf_import` (what it writes and its exit codes are
documented there and in docs/interop.md).

Only argparse and `stem_megatron.cli` are imported before `main` runs: torch and megatron-core
(seconds) are imported under `cli.run`, so a Ctrl-C while the command starts ends with one line and
exit 130.
"""

from __future__ import annotations

import argparse
import sys
import time

from stem_megatron import cli

PROG = "stem-import"


def main(argv=None) -> int:
    return cli.run(PROG, lambda: _main(argv))  # start-up (parsing, imports) under cli.run too: see above


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="`stem-import`: a dense Llama-family Hugging Face "
                                                        "checkpoint becomes a STEM checkpoint at step 0.")
    ap.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    ap.add_argument("--config", required=True, help="the experiment config the checkpoint is for")
    ap.add_argument("--output", required=True, help="save directory to create (step_00000000 + latest)")
    ap.add_argument("--table-init", choices=("up_proj", "random"), default="up_proj",
                    help="STEM tables: W_up . RMSNorm(emb) [up_proj], or the config's random init")
    ap.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = ap.parse_args(argv)
    cli.quiet_known_warnings()
    from stem_megatron import hf_import
    from stem_megatron.config import ConfigError, load_config

    def body() -> int:
        t0 = time.perf_counter()
        cfg = load_config(args.config, args.overrides)
        out = hf_import.import_hf(args.hf, cfg, args.output, args.table_init)
        layers = cfg.stem_layers
        print(f"stem-import: wrote {out} ({cfg.model.num_layers} layers, STEM layers {layers or 'none'}"
              + (f", tables by {args.table_init}" if layers else "") + f"; {time.perf_counter() - t0:.1f} s)")
        return 0

    return cli.run(PROG, body,
                   errors=((ConfigError, 2, ""), (hf_import.HFImportError, 2, ""), (FileNotFoundError, 2, "")),
                   interrupted_note="nothing written (import_hf removes its partial output)")


if __name__ == "__main__":
    sys.exit(main())
