"""scripts/bench_products.py's levers that force a float32 product whatever the platform chooses."""

import pytest

from jaxserve.bench import products
from jaxserve.ops import cpu_kernels, quant


def test_forced_float_products_hold_while_tracing_and_are_undone():
    chosen = quant.float_product
    with products.float_products_of("float32 xla-dot"):
        assert quant.float_product("cpu") == "xla_dot"
    assert quant.float_product is chosen
    if cpu_kernels.available():
        with products.float_products_of("float32 f32-kernel"):
            assert quant.float_product("cpu") == "f32_kernel"
        assert quant.float_product is chosen


def test_the_kernel_lever_refuses_where_the_kernels_did_not_build(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    with products.float_products_of("float32 f32-kernel"):
        with pytest.raises(RuntimeError, match="'float32 f32-kernel' needs the CPU kernels"):
            quant.float_product("cpu")
    assert products.LEVERS["float32 f32-kernel"][4] == "out_in"  # the rows the kernel reads
