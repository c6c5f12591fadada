"""Speculative decoding (draft model, the draft on a device of its own, prompt lookup) against
plain decoding on the embedded model: ms per token, tokens/s, acceptance, tokens per step at
batch 1 and 8, and the cost per token at tp = 1, 2, 4. The benchmark is
`jaxserve.bench.speculative`; `--help` lists the flags.
"""

from jaxserve.bench import speculative

if __name__ == "__main__":
    speculative.main(speculative.parse_args())
