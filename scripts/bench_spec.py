"""Speculative decoding (prompt lookup) against plain decoding on the embedded model: ms per
token, tokens/s, acceptance. The benchmark is `jaxserve.bench.speculative`; `--help` lists the
flags.
"""

from jaxserve.bench import speculative

if __name__ == "__main__":
    speculative.main(speculative.parse_args())
