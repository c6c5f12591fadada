"""Validate the performance model against published measurements: predicted next to published.
Needs no jax and no device. The table is `jaxserve.bench.validate_published`; `--help` lists
the flags, with examples.
"""

from jaxserve.bench import validate_published

if __name__ == "__main__":
    validate_published.main()
