"""How linear weights are stored on the devices (`ops.quant.float_weight_layout`, and
`int8_weight_layout` for int8 values with their scales): the
"out_in" layout computes the same products as the declared "in_out" one, its
logical axes move with its dims so every mesh shards it as before, checkpoints keep the
declared layout (a model restored, saved and restored again is bit-for-bit the same), and bad
layouts are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve import LLM
from jaxserve.checkpoint import declared_params, flat_params, restore_model, save_model
from jaxserve.config import ConfigError, ModelConfig
from jaxserve.ops.quant import (declare_weight, float_product, float_weight_layout, int8_product,
                                int8_weight_layout, project, stored_order, weight_layout_for)
from jaxserve.sharding import Layout

PROMPT = [[1, 5, 9, 2, 7, 3]]
# (declared shape, logical axes, the dims it contracts): the projections whose inputs lead
WEIGHTS = {"q_proj": ((64, 4, 16), ("embed", "q_heads", "head_dim"), (0, 1)),
           "o_proj": ((4, 16, 64), ("q_heads", "head_dim", "embed"), (0, 2)),
           "gate_proj": ((64, 96), ("embed", "mlp"), (0, 1))}


def declared(name, layout):
    shape, axes, inputs = WEIGHTS[name]
    with nnx.use_eager_sharding(False):
        return declare_weight(nnx.Rngs(0), shape, axes, jnp.float32, None, inputs,
                              layout=layout)


@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("name", WEIGHTS)
def test_an_out_in_weight_is_the_declared_one_transposed_and_computes_the_same_product(
        name, tokens):
    shape, axes, inputs = WEIGHTS[name]
    as_declared, out_in = declared(name, "in_out"), declared(name, "out_in")
    order = out_in.get_metadata()["stored_order"]
    assert out_in.shape != as_declared.shape and out_in.shape[-inputs[1]:] == shape[:inputs[1]]
    np.testing.assert_array_equal(out_in[...], np.transpose(as_declared[...], order))
    assert out_in.get_metadata()["out_sharding"] == tuple(axes[i] for i in order)
    k = int(np.prod(shape[:inputs[1]]))
    x = jax.random.normal(jax.random.key(1), (tokens, k), jnp.float32)
    want = np.asarray(project(x, as_declared))
    np.testing.assert_allclose(np.asarray(project(x, out_in)), want, rtol=1e-6,
                               atol=1e-6 * np.abs(want).max())


def test_the_platform_decides_the_layout_in_one_place_and_bad_layouts_are_named():
    # rows where the CPU's float32 kernel reads them; XLA's dots keep the declared layout
    assert float_weight_layout("cpu") == ("out_in" if float_product("cpu") == "f32_kernel"
                                          else "in_out")
    assert {float_weight_layout(p) for p in ("gpu", "tpu")} == {"in_out"}
    assert stored_order(2, (1, 2), "out_in") is None  # [vocab, embed]: inputs already last
    assert stored_order(3, (1, 2), "out_in") is None  # experts: outer dims, read whole
    with pytest.raises(ValueError, match="'sideways'"):
        stored_order(2, (0, 1), "sideways")
    with pytest.raises(ConfigError, match="weight_layout .*'sideways'"):
        ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                    num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                    max_position_embeddings=8, weight_layout="sideways")


def test_a_bad_layout_request_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="weight_layout.*'sideways'"):
        LLM(tmp_path, weight_layout="sideways")  # refused before the model is read


@pytest.fixture(scope="module")
def restored_both(hf_model_dir):
    """The llama test model restored at tp=2 in each layout."""
    _, model_dir = hf_model_dir("llama")
    layout = Layout.create("tp=2", "tp")
    return model_dir, layout, {name: restore_model(model_dir, layout, weight_layout=name)
                               for name in ("in_out", "out_in")}


def test_restore_transposes_on_load_and_shards_by_the_moved_axes(restored_both):
    _, _, both = restored_both
    (config_a, _, a), (config_b, _, b) = both["in_out"], both["out_in"]
    assert (config_a.weight_layout, config_b.weight_layout) == ("in_out", "out_in")
    q_a, q_b = a["layers"][0]["attn"]["q_proj"][...], b["layers"][0]["attn"]["q_proj"][...]
    assert q_a.shape == (64, 8, 8) and q_b.shape == (8, 8, 64)
    assert q_b.sharding.spec == jax.sharding.PartitionSpec("tp", None, None)
    assert {s.data.shape for s in q_b.addressable_shards} == {(4, 8, 64)}
    down = b["layers"][0]["mlp"]["down_proj"][...]  # [embed, mlp]: mlp split over tp
    assert down.sharding.spec == jax.sharding.PartitionSpec(None, "tp")
    declared_a, declared_b = declared_params(a), declared_params(b)
    assert declared_a.keys() == declared_b.keys()
    for name in declared_a:
        np.testing.assert_array_equal(np.asarray(declared_b[name]), np.asarray(declared_a[name]),
                                      err_msg=name)


def test_a_model_saved_from_the_out_in_layout_restores_bit_for_bit(restored_both, tmp_path):
    model_dir, layout, both = restored_both
    config, _, params = both["out_in"]
    save_model(tmp_path, config, params)
    for name in ("in_out", "out_in"):
        _, _, again = restore_model(tmp_path, layout, weight_layout=name)
        want, got = flat_params(both[name][2]), flat_params(again)
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]),
                                          err_msg=f"{name} {key}")


def test_the_out_in_engine_on_a_dp_tp_mesh_gives_the_single_device_in_out_logits(hf_model_dir):
    _, model_dir = hf_model_dir("qwen3")
    a = LLM(model_dir, weight_layout="in_out", compilation="on_use").logits(PROMPT)[0]
    b = LLM(model_dir, weight_layout="out_in", mesh="dp=2,tp=2", rules="dp_tp",
            compilation="on_use").logits(PROMPT)[0]
    # the tolerance of every mesh test (tests/test_checkpoint.py): tp sums in another order
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


def test_int8_weights_stored_out_in_restore_and_save_as_declared(hf_model_dir, tmp_path):
    # int8 rows [out, in] where the CPU kernel reads them (ops/quant.py), as declared elsewhere
    rows = "out_in" if int8_product("cpu") == "int8_kernel" else "in_out"
    assert (int8_weight_layout("cpu"), int8_weight_layout("gpu"), int8_weight_layout("tpu")) == (
        rows, "in_out", "in_out")
    assert (weight_layout_for("cpu", True), weight_layout_for("cpu", False)) == (
        rows, float_weight_layout("cpu"))
    _, model_dir = hf_model_dir("llama")
    layout = Layout.create("tp=2", "tp")
    restored = {name: restore_model(model_dir, layout, quantization="int8", weight_layout=name)
                for name in ("in_out", "out_in")}
    (_, _, a), (config_b, _, b) = restored["in_out"], restored["out_in"]
    qa, qb = a["layers"][0]["attn"]["q_proj"], b["layers"][0]["attn"]["q_proj"]
    assert qa["values"][...].shape == (64, 8, 8) and qb["values"][...].shape == (8, 8, 64)
    np.testing.assert_array_equal(np.asarray(qb["values"][...]),
                                  np.transpose(np.asarray(qa["values"][...]), (1, 2, 0)))
    np.testing.assert_array_equal(np.asarray(qb["scale"][...]),
                                  np.transpose(np.asarray(qa["scale"][...]), (1, 2, 0)))
    assert qb["values"][...].sharding.spec == jax.sharding.PartitionSpec("tp", None, None)
    declared_a, declared_b = declared_params(a), declared_params(b)
    for name in declared_a:
        np.testing.assert_array_equal(np.asarray(declared_b[name]), np.asarray(declared_a[name]),
                                      err_msg=name)
    save_model(tmp_path, config_b, b)  # a quantized checkpoint, as declared
    _, _, again = restore_model(tmp_path, layout, weight_layout="out_in")
    want, got = flat_params(b), flat_params(again)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_the_out_in_int8_engine_on_tp_gives_the_single_device_in_out_int8_logits(hf_model_dir):
    _, model_dir = hf_model_dir("qwen3")
    a = LLM(model_dir, quantization="int8", weight_layout="in_out",
            compilation="on_use").logits(PROMPT)[0]
    b = LLM(model_dir, quantization="int8", weight_layout="out_in", mesh="tp=2",
            compilation="on_use").logits(PROMPT)[0]
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
