"""Fit the performance model's free constants on one named source of published rows and score
the held-out rest. Needs no jax and no device. The procedure is `jaxserve.bench.fit_published`;
`--help` lists the flags.
"""

from jaxserve.bench import fit_published

if __name__ == "__main__":
    fit_published.main()
