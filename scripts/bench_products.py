"""CPU decode levers side by side (float32, bfloat16, int8 weights: dequantize-then-dot or the
int8 dot): the decode products of the model's own weights, then the engine's decode step,
against their byte floor. The benchmark is `jaxserve.bench.products`; `--help` lists the flags.
"""

from jaxserve.bench import products

if __name__ == "__main__":
    products.main(products.parse_args())
