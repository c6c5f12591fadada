"""Rules files and mesh strings: every bad one is rejected with a message naming the bad thing."""

import pytest

from jaxserve import LLM
from jaxserve.sharding import Layout, ShardingError, load_rules, parse_mesh, replicas_of


def test_mesh_string_parses_in_order():
    assert list(parse_mesh("dp=2,tp=4").items()) == [("dp", 2), ("tp", 4)]


@pytest.mark.parametrize("text,named", [
    ("", "mesh"), ("tp", "'tp'"), ("tp=0", "'tp'"), ("tp=x", "'x'"), ("xx=2", "'xx'"),
    ("tp=2,tp=2", "'tp' given twice"), ("tp=-1", "'tp'"),
])
def test_bad_mesh_strings_are_rejected_naming_the_entry(text, named):
    with pytest.raises(ShardingError, match=named):
        parse_mesh(text)


def test_more_devices_than_exist_is_rejected():
    with pytest.raises(ShardingError, match="needs 16 devices but only 8"):
        Layout.create("dp=2,tp=8", "dp_tp")


def write_rules(tmp_path, text):
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("body,named", [
    ("rules:\n  heads: tp\n", "unknown logical axis 'heads'"),
    ("rules:\n  mlp: zz\n", "unknown mesh axis 'zz'"),
    ("rules:\n  mlp: 3\n", "'mlp' maps to 3"),
    ("rule:\n  mlp: tp\n", "'rules' mapping"),
    ("rules:\n  mlp: tp\nextra: 1\n", "extra"),
    ("rules: [\n", "not valid YAML"),
])
def test_bad_rules_files_are_rejected_naming_file_and_axis(tmp_path, body, named):
    path = write_rules(tmp_path, body)
    with pytest.raises(ShardingError, match=named) as err:
        load_rules(path)
    assert str(path) in str(err.value)


def test_unknown_rules_name_lists_the_builtin_ones():
    with pytest.raises(ShardingError, match="built-in rules: dp, dp_ep, dp_tp, ep, tp, tp_ep"):
        load_rules("nope")


def test_rules_axis_missing_from_mesh_is_rejected():
    with pytest.raises(ShardingError, match="dp_tp.yaml: uses mesh axis 'dp'"):
        Layout.create("tp=2", "dp_tp")


def test_mesh_axis_unused_by_rules_is_rejected():
    with pytest.raises(ShardingError, match="mesh axis 'dp' \\(size 2\\) is not used"):
        Layout.create("dp=2,tp=2", "tp")


def test_dimension_not_divisible_by_mesh_axis_names_file_axis_and_sizes(hf_model_dir):
    _, model_dir = hf_model_dir("llama")  # vocab 512, 8 q heads, mlp 128: none divide by 3
    with pytest.raises(ShardingError) as err:
        LLM(model_dir, mesh="tp=3", rules="tp")
    msg = str(err.value)
    assert "sharding_rules/tp.yaml" in msg and "not divisible by mesh axis 'tp' of size 3" in msg
    assert "logical axis 'vocab'" in msg or "logical axis 'q_heads'" in msg


def test_kv_heads_fewer_than_tp_are_an_error_unless_lenient():
    """No silent replication: placement.fit_to_layout repeats KV heads before a spec is asked for;
    only a tensor staged at its checkpoint shape asks for a lenient spec."""
    layout = Layout.create("tp=8", "tp")
    with pytest.raises(ShardingError, match="logical axis 'kv_heads' of k_proj has size 2, not "
                                            "divisible by mesh axis 'tp' of size 8"):
        layout.spec(("embed", "kv_heads", "head_dim"), (64, 2, 8), "k_proj")
    assert layout.spec(("embed", "kv_heads", "head_dim"), (64, 2, 8), lenient=True) == \
        layout.spec(("embed", None, None), (64, 2, 8))
    assert layout.spec(("embed", "kv_heads", "head_dim"), (64, 8, 8))[1] == "tp"
    assert layout.spec(("vocab", "embed"), (517, 64), lenient=True)[0] is None


def test_rules_that_split_batch_but_not_the_kv_pool_are_rejected(tmp_path):
    path = tmp_path / "dp_shared_pool.yaml"
    path.write_text("rules:\n  batch: dp\n  kv_blocks: null\n")
    layout = Layout.create("dp=2", str(path))
    with pytest.raises(ShardingError, match=r"'batch' is split over \['dp'\] but 'kv_blocks' "
                                            r"over \[\]"):
        replicas_of(layout)
    assert replicas_of(Layout.create("dp=2", "dp")) == 2
    assert replicas_of(Layout.create("tp=2", "tp")) == 1
