"""launch/: the launchers (torchrun.sh, slurm.sbatch) and the offline wheelhouse (`make wheelhouse`).

A package only so that `python -m launch.wheelhouse` and benchmarks/gpu_check.py can import the
wheelhouse modules from a checkout; the library (`stem_megatron`) never imports it.
"""
