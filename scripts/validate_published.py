"""Validate the performance model against published measurements: predicted next to published
(`jaxserve.bench.validate_published`, --help). Needs no jax and no device.

    python scripts/validate_published.py [--json benchmarks/validate_published.json]
"""

from jaxserve.bench import validate_published

if __name__ == "__main__":
    validate_published.main()
