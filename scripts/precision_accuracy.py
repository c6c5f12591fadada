"""Accuracy of each precision format (int8 weights, bf16, KV cache formats) against the float32
model: logit error, greedy agreement and perplexity on held-out Python sources. The report is
`jaxserve.bench.accuracy`; `--help` says what it measures and lists the flags, with examples.
"""

from jaxserve.bench import accuracy

if __name__ == "__main__":
    accuracy.main()
