"""The analytical performance model: shapes, counts and formulas against hand results, bounds
no prediction may beat, and `jaxserve plan` / `calibrate` end to end."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from jaxserve import flops
from jaxserve.cli import main
from jaxserve.config import ModelConfig, from_hf_config
from jaxserve.perf import collectives
from jaxserve.perf.plan import SLO, PlanError, load_model_config, plan
from jaxserve.perf.precision import Precision
from jaxserve.perf.profiles import (HARDWARE_DIR, HostOverhead, Link, ProfileError,
                                    builtin_profiles, load_hardware)
from jaxserve.perf.serving import colocated
from jaxserve.perf.shapes import parameters
from jaxserve.perf.step import Chunk, Deployment, decode_chunk
from jaxserve.perf.workload import Workload, WorkloadError
from tests.test_deepseek import _hf_config

# Tiny configs whose counts are worked out by hand below. Embed 16, 4 query heads and 2 KV
# heads of 4, MLP 32, 2 layers, vocabulary 100.
TINY = ModelConfig(family="llama", vocab_size=100, hidden_size=16, intermediate_size=32,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                   max_position_embeddings=64)
# Layer 0 dense, layer 1 MoE: 4 experts of width 8, top-2.
TINY_MOE = dataclasses.replace(TINY, family="qwen3_moe", qk_norm=True, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=8,
                               mlp_only_layers=(0,))

# Published config.json files (field values as the model repositories publish them).
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 28672,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256}
QWEN3_235B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 94,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 1536,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 94, "num_key_value_heads": 4,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
LLAMA31_8B = dict(LLAMA3_70B, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_hidden_layers=32, num_key_value_heads=8)
MIXTRAL_8X22B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 6144, "initializer_range": 0.02,
    "intermediate_size": 16384, "max_position_embeddings": 65536, "model_type": "mixtral",
    "num_attention_heads": 48, "num_experts_per_tok": 2, "num_hidden_layers": 56,
    "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0", "use_cache": True, "vocab_size": 32000}


def bare(peak: float = 1e12, bandwidth: float = 1e11, host: float = 0.0):
    """A device with flat efficiency 1, so times are FLOPs / peak and bytes / bandwidth."""
    hw = load_hardware("h100")
    return dataclasses.replace(hw, peak_flops={"float32": peak, "bfloat16": peak},
                               matmul_efficiency={"default": {0: ((1, 1.0),)}},
                               memory_bandwidth=bandwidth, bandwidth_efficiency=1.0,
                               attention_efficiency=1.0, attention_query_block=16,
                               host=HostOverhead(host, 0.0))


def write_config(tmp_path, name, doc):
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc))
    return path


# ---- what a model holds ----

@pytest.mark.parametrize("config", [
    TINY, TINY_MOE, dataclasses.replace(TINY, tie_word_embeddings=True),
    dataclasses.replace(TINY_MOE, family="mixtral", qk_norm=False, mlp_only_layers=()),
    dataclasses.replace(TINY, padded_vocab_size=104, kv_head_copies=2),
    *(from_hf_config(_hf_config(f)) for f in ("deepseek_v2", "deepseek_v3"))])
def test_parameters_are_the_models_own(config):
    """Latent attention too: q_lora_rank set (V3) or not (V2), shared experts, V3's bias."""
    from jaxserve.checkpoint import param_specs

    ours = {name: (p.shape, p.axes) for name, p in parameters(config).items()}
    assert ours == param_specs(config)


@pytest.mark.parametrize("mesh,rules", [(None, "tp"), ("tp=2", "tp"), ("tp=4", "tp"),
                                        ("dp=2,tp=2", "dp_tp"), ("ep=2", "ep")])
def test_kv_bytes_per_token_are_the_engines_pool_sizing(mesh, rules):
    import jax.numpy as jnp

    from jaxserve.engine.sizing import bytes_per_block_per_device
    from jaxserve.models.layers import kv_cache_spec
    from jaxserve.sharding import Layout

    d = Deployment(TINY_MOE, mesh, rules, bare(), Precision("bfloat16"))
    layout = Layout.create(mesh, rules, abstract=True)
    spec = kv_cache_spec(d.config, jnp.bfloat16)
    assert d.kv_bytes_per_token * 16 == bytes_per_block_per_device(spec, 16, layout)


def test_the_local_profile_tiles_prefill_like_the_engine():
    from jaxserve.engine.step_builder import QUERY_TILE

    assert load_hardware("cpu-local").attention_query_block == QUERY_TILE


# ---- FLOPs and bytes against hand counts ----

def test_tiny_dense_decode_counts_match_a_hand_count():
    d = Deployment(TINY, None, "tp", bare(), Precision("float32"))
    step = d.step([decode_chunk(5, 2)])  # two sequences decoding position 5 (6 keys)
    ops = {o.name: o for o in step.ops}
    # per token and layer: q 16x4x4 + k, v 16x2x4 + o 4x4x16 = 768 MACs; 2 tokens, 2 layers
    assert ops["q/k/v/o projections"].flops == 2 * 768 * 2 * 2
    assert ops["q/k/v/o projections"].bytes == 768 * 2 * 4
    assert ops["mlp"].flops == 2 * 3 * 16 * 32 * 2 * 2
    assert ops["mlp"].bytes == 3 * 16 * 32 * 2 * 4
    # scores and values over 6 keys, 4 heads of 4, 2 layers, 2 sequences
    assert ops["attention over the context"].flops == 2 * 2 * 4 * 4 * 6 * 2 * 2
    # KV per token: 2 layers x (k, v) x 2 heads x 4 x 4 bytes = 128; 6 read + 1 written each
    assert ops["attention over the context"].bytes == 128 * 6 * 2 + 128 * 2
    assert ops["lm head"].flops == 2 * 16 * 100 * 2
    assert ops["lm head"].bytes == 100 * 16 * 4
    assert step.flops == flops.chunk_flops(TINY, 5, 6) * 2
    assert step.collectives == ()


def test_tiny_dense_counts_split_over_tensor_parallel_devices():
    two = Deployment(TINY, "tp=2", "tp", bare(), Precision("float32"))
    one = Deployment(TINY, None, "tp", bare(), Precision("float32"))
    chunk = [Chunk(0, 8)]
    assert two.step(chunk).flops == pytest.approx(one.step(chunk).flops / 2)
    # attention and MLP weights of 2 layers, embedding and LM head are halved; the norms
    # (2 per layer and the final one, 16 each) are on every device
    split = (768 + 3 * 16 * 32) * 2 + 2 * 100 * 16
    assert one.weight_bytes_per_device == (split + 5 * 16) * 4
    assert two.weight_bytes_per_device == (split / 2 + 5 * 16) * 4
    # tp=4: the 2 KV heads are stored twice, so a device holds 1 of 2 true K/V heads: q and o
    # a quarter (64 + 64 MACs), k and v one head each (64 + 64) = 256 of 768 per token
    four = Deployment(TINY, "tp=4", "tp", bare(), Precision("float32"))
    ops = {o.name: o for o in four.step(chunk).ops}
    assert ops["q/k/v/o projections"].flops == 2 * 256 * 8 * 2
    # o_proj and down_proj contract split axes: one all-reduce of [8, 16] float32 each, per
    # layer; the embedding (vocabulary split) one more; logits gathered for the sampled row
    coll = {c.name: c for c in four.step(chunk).collectives}
    assert coll["attention partial sums"].calls == 2
    assert coll["attention partial sums"].nbytes == 8 * 16 * 4
    assert coll["mlp partial sums"].calls == 2
    assert coll["embed partial sums"].calls == 1
    assert coll["logits gathered for sampling"].nbytes == 1 * 100 * 4


def test_tiny_moe_counts_match_a_hand_count():
    d = Deployment(TINY_MOE, None, "tp", bare(), Precision("float32"), "alltoall")
    step = d.step([decode_chunk(3, 1)])
    ops = {o.name: o for o in step.ops}
    assert ops["router"].flops == 2 * 16 * 4
    assert ops["experts (all-to-all)"].flops == 2 * (2 * 3 * 16 * 8)  # top-2 experts
    # one token touches 2 of 4 experts: 4 (1 - (1 - 2/4)^1) = 2 experts of 3 [16x8] weights
    assert ops["experts (all-to-all)"].bytes == pytest.approx(2 * 3 * 16 * 8 * 4)
    assert ops["mlp"].flops == 2 * 3 * 16 * 32  # layer 0 is dense
    assert step.flops == flops.chunk_flops(TINY_MOE, 3, 4)

    # ep=2: every device is an attention replica; the two exchange their tokens' pairs, so a
    # device runs 2 tokens x 2 pairs over 2 devices = 2 pairs and reads its experts hit by
    # 2 tokens: 2 x (1 - (1/2)^2) = 1.5
    ep = Deployment(TINY_MOE, "ep=2", "ep", bare(), Precision("float32"), "alltoall")
    step = ep.step([decode_chunk(3, 1)])
    ops = {o.name: o for o in step.ops}
    assert ops["experts (all-to-all)"].flops == 2 * (2 * 3 * 16 * 8)
    assert ops["experts (all-to-all)"].bytes == pytest.approx(1.5 * 3 * 16 * 8 * 4)
    (exchange,) = [c for c in step.collectives if c.kind == "all-to-all"]
    assert (exchange.calls, exchange.nbytes, exchange.group.size) == (2, 1 * 2 * 16 * 4, 2)
    gather = Deployment(TINY_MOE, "ep=2", "ep", bare(), Precision("float32"), "allgather")
    (weights,) = [c for c in gather.step([decode_chunk(3, 1)]).collectives]
    assert weights.kind == "all-gather" and weights.nbytes == 4 * 3 * 16 * 8 * 4


# ---- collectives ----

LINK = Link(bandwidth=1e9, latency=1e-5)


def test_ring_and_tree_formulas_match_hand_results():
    assert collectives.ring_all_reduce(1e6, 4, LINK) == pytest.approx(2 * 3 / 4 * 1e-3 + 6e-5)
    assert collectives.tree_all_reduce(1e6, 4, LINK) == pytest.approx(4e-5 + 2e-3)
    assert collectives.all_reduce(1e6, 4, LINK) == pytest.approx(1.56e-3)  # ring wins
    assert collectives.all_reduce(1e3, 8, LINK) == pytest.approx(6e-5 + 2e-6)  # tree wins
    assert collectives.all_gather(8e6, 8, LINK) == pytest.approx(7e-3 + 7e-5)
    assert collectives.all_to_all(2e6, 2, LINK) == pytest.approx(1e-3 + 1e-5)
    assert collectives.all_reduce(1e6, 1, LINK) == 0.0
    assert collectives.ring_all_reduce(1e6, 2, Link(1e9, 0.0, efficiency=0.5)) == \
        pytest.approx(2e-3)


def test_groups_follow_the_mesh_order_and_span_hosts_hierarchically():
    mesh = {"dp": 4, "tp": 8}
    assert collectives.group_of(mesh, ("tp",), 8) == collectives.Group(8, 8)
    assert collectives.group_of(mesh, ("dp",), 8) == collectives.Group(4, 1)
    assert collectives.group_of(mesh, ("dp", "tp"), 8) == collectives.Group(32, 8)
    hw = dataclasses.replace(load_hardware("h100"), intra_host=Link(1e11, 1e-6),
                             inter_host=Link(1e10, 1e-5))
    group = collectives.Group(16, 8)  # 8 devices on each of 2 hosts
    expected = (7 / 8 * 8e6 / 1e11 + 7e-6  # reduce-scatter in each host
                + min(2 * 1 / 2 * 1e6 / 1e10 + 2e-5, 2 * 1e-5 + 2e6 / 1e10)  # 2 hosts
                + 7 / 8 * 8e6 / 1e11 + 7e-6)  # all-gather in each host
    assert collectives.group_all_reduce(8e6, group, hw) == pytest.approx(expected)


# ---- bounds no prediction may beat ----

@pytest.mark.parametrize("name", builtin_profiles())
@pytest.mark.parametrize("hf,mesh,rules", [(LLAMA3_70B, "tp=8", "tp"),
                                           (LLAMA3_70B, "tp=2", "tp"),
                                           (QWEN3_235B, "tp=2,ep=4", "tp_ep"),
                                           (MIXTRAL_8X22B, "ep=8", "ep")])
def test_no_step_beats_the_roofline(name, hf, mesh, rules):
    from jaxserve.config import from_hf_config

    hw = load_hardware(name)
    config = from_hf_config(hf)
    precision = Precision("bfloat16" if "bfloat16" in hw.peak_flops else "float32")
    d = Deployment(config, mesh, rules, hw, precision)
    # decode at batch 1 reads at least every weight of a device it uses (experts: the top-k)
    decode = d.step([decode_chunk(100, 1)])
    dense_bytes = d.weight_bytes_per_device - d.op_bytes("experts")
    assert decode.device_s >= dense_bytes / hw.memory_bandwidth
    # prefill does at least its FLOPs at the peak of all devices
    prefill = d.step([Chunk(0, 2048)])
    true = flops.chunk_flops(config, 0, 2048) * d.replicas
    assert prefill.device_s >= true / (d.devices * hw.peak_flops[precision.compute])


# ---- the workload on a layout ----

def test_operating_point_respects_the_engine_limits():
    d = Deployment(TINY, None, "tp", bare(), Precision("float32"))
    w = Workload.from_dict({"prompt_len": 32, "output_len": 16, "max_num_seqs": 4,
                            "max_num_batched_tokens": 512})
    op = colocated(d, w)
    assert op.batch == 4 and op.limited_by == "max_num_seqs"
    assert op.output_tokens_per_s == pytest.approx(4 / op.step.total_s)
    slow = colocated(d, dataclasses.replace(w, rate=0.5 * op.requests_per_s))
    assert slow.batch < op.batch and slow.limited_by == "rate"
    assert slow.requests_per_s == pytest.approx(0.5 * op.requests_per_s, rel=1e-3)


# ---- plan ----

def test_plan_runs_end_to_end_on_hf_config_json(tmp_path, capsys):
    for name, doc in (("Llama-3-70B", LLAMA3_70B), ("Qwen3-235B-A22B", QWEN3_235B),
                      ("Mixtral-8x22B", MIXTRAL_8X22B)):
        path = write_config(tmp_path, name, doc)
        out = tmp_path / f"{name}.json"
        assert main(["plan", "--model", str(path), "--devices", "16", "--hardware", "h100",
                     "--slo", "ttft=2s,tpot=100ms", "--json", str(out)]) == 0
        table = capsys.readouterr().out
        assert name in table and "t_e = " in table and "bottleneck" in table
        result = json.loads(out.read_text())
        colocated = [c for c in result["layouts"] if c["kind"] == "colocated"]
        best = max(colocated, key=lambda c: c["output_tokens_per_s"])
        assert result["t_e"] == best["tp"]  # t_e: the TP degree of the best colocated layout
        assert result["throughput_by_tp"][str(best["tp"])] == best["output_tokens_per_s"]
        assert {c["kind"] for c in result["layouts"]} == {"colocated", "disaggregated"}
        assert all(c["bottleneck"] in ("compute", "memory bandwidth", "interconnect", "host",
                                       "kernel launches", "KV capacity")
                   for c in result["layouts"])


def test_t_e_falls_as_the_host_term_grows_on_an_idealised_device(tmp_path, capsys):
    """Albireo's t_e, on an idealised device only (the h100 test below shows it does not hold
    there): more TP frees memory for KV (bigger batches, fewer weight reads per token) until
    the host's per-sequence time, which no TP degree shrinks, outweighs it. On a device where
    only memory and the host matter (compute and links free), per-device
    throughput is 1 / (t h + (W / B(t) + K) / bandwidth) with B(t) = (t M - W) / K, whose best
    t falls as the serial term h grows."""
    from jaxserve.perf.profiles import save_hardware

    device = dataclasses.replace(
        bare(peak=1e18, bandwidth=1e12), memory_capacity=24e9, memory_fraction=1.0,
        intra_host=Link(1e15, 0.0), inter_host=Link(1e15, 0.0), layer_overhead_s=0.0)
    save_hardware(device, tmp_path / "device.yaml")
    (tmp_path / "load.yaml").write_text("prompt_len: 2048\noutput_len: 512\n"
                                        "max_num_seqs: 100000\nmax_num_batched_tokens: 10000000\n")
    model = write_config(tmp_path, "Llama-3.1-8B", LLAMA31_8B)
    t_e = []
    for host_us in (0, 10, 100, 1000):
        out = tmp_path / f"host{host_us}.json"
        assert main(["plan", "--model", str(model), "--devices", "16", "--hardware",
                     str(tmp_path / "device.yaml"), "--workload", str(tmp_path / "load.yaml"),
                     "--colocated-only", "--host-step-ms", "0", "--host-seq-us", str(host_us),
                     "--json", str(out)]) == 0
        t_e.append(json.loads(out.read_text())["t_e"])
    capsys.readouterr()
    assert t_e == sorted(t_e, reverse=True) and t_e[0] >= 4 and t_e[-1] == 1, t_e


def test_on_the_h100_profile_host_time_does_not_move_t_e_for_qwen3_235b():
    """On a realistic profile the idealised claim does not hold: with Qwen3-235B on 16 H100s
    the best colocated TP degree stays 2 whether the host costs 0, 5 or 20 ms a step (every
    layout pays the same per-step host time, and compute and links are not free), and grows
    with a large per-sequence host time. README says so; this pins it."""
    config = load_model_config_from(QWEN3_235B)
    h100 = load_hardware("h100")

    def t_e(step_s, sequence_s):
        hw = dataclasses.replace(h100, host=HostOverhead(step_s, sequence_s))
        return plan(config, 16, hw, Workload(), disaggregated=False).t_e

    assert [t_e(s, 0.0) for s in (0.0, 5e-3, 20e-3)] == [2, 2, 2]
    assert t_e(0.0, 1e-3) == 4


def test_layouts_that_cannot_hold_the_model_are_skipped_with_the_reason():
    config = load_model_config_from(LLAMA3_70B)
    result = plan(config, 8, load_hardware("h100"), Workload(), disaggregated=False)
    assert "8 x tp=1 (tp)" in result.skipped
    assert "GB per device" in result.skipped["8 x tp=1 (tp)"]
    assert all(c.tp > 1 for c in result.candidates)


def load_model_config_from(doc):
    from jaxserve.config import from_hf_config

    return from_hf_config(doc)


# ---- bad input is named ----

def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ProfileError, match="'nope'.*built-in: .*h100"):
        load_hardware("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npeak_flops: {bfloat16: fast}\n")
    with pytest.raises(ProfileError, match="missing field"):
        load_hardware(bad)
    h100 = (HARDWARE_DIR / "h100.yaml").read_text()
    bad.write_text(h100.replace("efficiency: 0.8}  # NVLink",
                                "efficiency: 0.8, unknown: 5}  # NVLink"))
    with pytest.raises(ProfileError, match=r"intra_host\.unknown must be text .*, got 5"):
        load_hardware(bad)
    with pytest.raises(WorkloadError, match=r"unknown field\(s\) \['prompt'\]"):
        Workload.from_dict({"prompt": 5})
    with pytest.raises(WorkloadError, match=r"prompt_len: uniform takes a list \[lo, hi\], got 5"):
        Workload.from_dict({"prompt_len": {"uniform": 5}})
    with pytest.raises(WorkloadError, match=r"uniform takes a list \[lo, hi\], got \[1, 2, 3\]"):
        Workload.from_dict({"output_len": {"uniform": [1, 2, 3]}})
    with pytest.raises(WorkloadError, match=r"prompt_len: values takes a list \[x, .*\], got 5"):
        Workload.from_dict({"prompt_len": {"values": 5}})
    with pytest.raises(WorkloadError, match="positive integers, got -3"):
        Workload.from_dict({"output_len": -3})
    with pytest.raises(WorkloadError, match="concurrency or rate, not both"):
        Workload.from_dict({"rate": 1, "concurrency": 2})
    with pytest.raises(PlanError, match="'fast'"):
        SLO.parse("ttft=fast")
    with pytest.raises(ProfileError, match="'int4'"):
        Precision.parse("weights=int4")
    with pytest.raises(PlanError, match="no float8 products"):
        plan(TINY, 2, load_hardware("a100-80gb"), Workload(), Precision.parse("float8"))
    with pytest.raises(PlanError, match="devices must be a positive integer, got 0"):
        plan(TINY, 0, load_hardware("h100"), Workload())
    assert SLO.parse("ttft=500ms, tpot=0.05") == SLO(0.5, 0.05)
    assert str(Precision.parse("weights=int8")) == "weights=int8,kv=bfloat16,compute=bfloat16"
    assert load_model_config(str(write_config(tmp_path, "m", LLAMA3_70B).parent))[1] == "m"


def test_the_planner_imports_without_jax():
    code = ("import sys; import jaxserve.perf.plan, jaxserve.perf.serving, jaxserve.cli; "
            "assert 'jax' not in sys.modules, 'jax was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_calibrate_writes_a_profile_plan_can_read(tmp_path, capsys):
    out = tmp_path / "here.yaml"
    assert main(["calibrate", "--quick", "--out", str(out)]) == 0
    hw = load_hardware(out)
    assert hw.shared_compute and hw.devices_per_host == 8  # the test's simulated devices
    matmul = hw.measured["matmul_float32"]  # the peak is the fastest product it timed
    assert hw.peak_flops["float32"] == max(matmul["square_flops_per_s"], *(
        x for by_rows in matmul["flops_per_s_by_width_and_rows"].values()
        for x in by_rows.values()))
    assert hw.memory_bandwidth == hw.measured["read_bytes_per_s"]
    assert all(0 < f <= 1 for classes in hw.matmul_efficiency.values()
               for curve in classes.values() for _, f in curve)
    assert hw.host.per_step_s >= 0 and hw.intra_host.bandwidth > 0
    # one host of 8 simulated devices: nothing timed the link between hosts
    assert hw.inter_host.unknown == "one host: the within-host link stands in"
    assert main(["plan", "--model", str(write_config(tmp_path, "tiny", {
        "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2}))
        , "--devices", "2", "--hardware", str(out), "--precision", "float32"]) == 0
    capsys.readouterr()


def cited_numbers(sources) -> list[float]:
    """Every number written in the sources ("2,039 GB/s" -> 2039)."""
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", " ".join(sources))]


def cited(value: float, numbers: list[float]) -> bool:
    return any(abs(value - n) <= 0.005 * n for n in numbers if n > 0)


def test_calibrate_on_one_device_flags_its_links_and_plan_says_so(tmp_path, capsys):
    """One device has no link to time: calibrate writes stand-ins marked unknown (and warns),
    and a plan over more than one device on that profile prints a warning per link it uses;
    a published profile prints none."""
    out = tmp_path / "one.yaml"
    env = dict(os.environ, XLA_FLAGS=" ".join(  # the suite's flags, less its device count
        f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f))
    result = subprocess.run([sys.executable, "-m", "jaxserve.cli", "calibrate", "--quick",
                             "--devices", "1", "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "warning: the intra_host link was not measured (one device" in result.stderr
    written = yaml.safe_load(out.read_text())
    for name in ("intra_host", "inter_host"):
        assert written[name]["unknown"].startswith("one device: its memory bandwidth"), written
    hw = load_hardware(out)
    assert hw.devices_per_host == 1 and hw.intra_host.latency == 0
    model = write_config(tmp_path, "tiny", {
        "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2})
    plan_json = tmp_path / "plan.json"
    assert main(["plan", "--model", str(model), "--devices", "2", "--hardware", str(out),
                 "--precision", "float32", "--json", str(plan_json)]) == 0
    table = capsys.readouterr().out
    warnings = json.loads(plan_json.read_text())["warnings"]
    assert [w.split(" link ")[0] for w in warnings] == [
        f"warning: {hw.name}: the intra_host", f"warning: {hw.name}: the inter_host"]
    assert all(w in table for w in warnings)
    assert main(["plan", "--model", str(model), "--devices", "2", "--hardware", "h100",
                 "--json", str(plan_json)]) == 0
    assert "warning" not in capsys.readouterr().out
    assert json.loads(plan_json.read_text())["warnings"] == []


@pytest.mark.parametrize("name", builtin_profiles())
def test_builtin_profiles_load_and_cite_their_sources(name):
    """Each published figure (peak FLOP/s per dtype in TFLOPS, HBM bandwidth in TB/s or GB/s,
    memory in GB, the price inside a cited $ range) is written in one of the profile's
    sources; a calibrated profile instead records what it measured."""
    hw = load_hardware(name)
    assert math.isfinite(hw.matmul_rate(next(iter(hw.peak_flops)), 64))
    if hw.measured is not None:
        assert {f"matmul_{dtype}" for dtype in hw.peak_flops} | {
            "read_bytes_per_s", "kv_read_bytes_per_s", "layer_overhead_s"} <= set(hw.measured)
        assert hw.memory_bandwidth == hw.measured["read_bytes_per_s"]
        return
    numbers = cited_numbers(hw.sources)
    for dtype, flops in hw.peak_flops.items():
        assert cited(flops / 1e12, numbers), (name, dtype, flops)
    assert cited(hw.memory_bandwidth / 1e12, numbers) or cited(hw.memory_bandwidth / 1e9,
                                                                 numbers), hw.memory_bandwidth
    assert cited(hw.memory_capacity / 1e9, numbers), hw.memory_capacity
    if hw.price_per_hour is not None:
        ranges = [(float(lo), float(hi or lo)) for lo, hi in
                  re.findall(r"\$(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?", " ".join(hw.sources))]
        assert any(lo <= hw.price_per_hour <= hi for lo, hi in ranges), (name, ranges)
    assert any(s.startswith("host: assumed") for s in hw.sources)  # not measured: said so


@pytest.mark.parametrize("hw,mesh,rules", [("h100", "tp=2,ep=4", "tp_ep"),
                                           ("tpu-v5p", "dp=2,ep=4", "dp_ep"),
                                           ("cpu-local", "ep=8", "ep")])
def test_moe_auto_switches_where_the_strategies_cross_as_the_engine_does(hw, mesh, rules):
    from jaxserve.ops.moe import MoEExecution

    d = Deployment(load_model_config_from(QWEN3_235B), mesh, rules, load_hardware(hw))
    c = d.moe_crossover_tokens()
    assert 0 < c < 1 << 20
    per = d.replicas  # the engine counts the tokens of all replicas; the model per replica

    def faster(total):
        t = total / per
        return min(("alltoall", "allgather"), key=lambda s: d.moe_experts_seconds(t, s))

    assert faster(c) == "alltoall" and faster(c + 1) == "allgather"  # the crossover is real
    assert faster(c // 4) == "alltoall" and faster(4 * c) == "allgather"
    engine = MoEExecution("auto", auto_threshold=c)
    for total in (1, 64, c // 2, c, c + 1, 3 * c):
        assert d.step([Chunk(0, 1, total / per)]).moe_strategy == engine.resolve(total), total
    fixed = Deployment(d.base, mesh, rules, d.hardware, moe_auto_threshold=100)
    assert fixed.moe_auto_threshold == 100
    assert [fixed.step([Chunk(0, 1, n / per)]).moe_strategy for n in (100, 101)] == [
        "alltoall", "allgather"]
    with pytest.raises(ValueError, match="no MoE layers"):
        Deployment(TINY, None, "tp", d.hardware).moe_crossover_tokens()
    # a MoE family whose layers are all dense (DeepSeek's first_k_dense_replace >= layers):
    # no experts in its step, and no crossover
    dense = dataclasses.replace(d.base, mlp_only_layers=tuple(range(d.base.num_layers)))
    step = Deployment(dense, mesh, rules, d.hardware).step([Chunk(0, 1, 8)])
    assert step.moe_strategy is None and not any("experts" in op.name for op in step.ops)
    with pytest.raises(ValueError, match="no MoE layers"):
        Deployment(dense, mesh, rules, d.hardware).moe_crossover_tokens()


def test_the_fixed_capacity_exchange_moves_and_computes_senders_times_the_pairs():
    """XLA:CPU's alltoall: every (sender, receiver) slot holds all of the sender's pairs."""
    hw = bare()
    ragged, fixed = (Deployment(TINY_MOE, "ep=4", "ep", hw, moe_exchange=x)
                     for x in ("ragged", "fixed"))
    for tokens in (1, 8, 64):
        r, f = (d.step([Chunk(0, 1, tokens)], "alltoall") for d in (ragged, fixed))
        op = {d: next(o for o in t.ops if o.name.startswith("experts")) for d, t in
              (("r", r), ("f", f))}
        # ragged: the group's 4 x tokens x 2 pairs spread over 4 owners; fixed: 4 slots each
        assert op["r"].flops == pytest.approx(tokens * 2 * flops.expert_flops(TINY_MOE))
        assert op["f"].flops == pytest.approx(4 * tokens * 2 * flops.expert_flops(TINY_MOE))
        sent = {k: next(c for c in t.collectives if c.kind == "all-to-all").nbytes
                for k, t in (("r", r), ("f", f))}
        assert sent["f"] == 4 * sent["r"] == 4 * tokens * 2 * 16 * 2
    with pytest.raises(ValueError, match="'sparse'"):
        Deployment(TINY_MOE, "ep=4", "ep", hw, moe_exchange="sparse")
