"""The first-GPU check: HF parity (dense and MoE), decode vs the HBM roofline, prefill vs peak
FLOPs, a calibrated profile and the performance model's predictions, in one JSON and one
markdown section, within 8 minutes on one H100/H200. `--dry-run`: the same on one CPU device
at the tiniest sizes. The check is `jaxserve.bench.gpu_check`; `--help` lists the flags.

    python scripts/gpu_check.py --out benchmarks/gpu_check-h200.json --markdown BENCHMARKS.md
"""

from jaxserve.bench import gpu_check

if __name__ == "__main__":
    gpu_check.main()
