"""Energy per step and per output token (jaxserve.perf.energy) against hand arithmetic, and the
joules column of `jaxserve plan`. No jax, no device: the figures are priced traffic, not
measurements."""

import dataclasses

import pytest

from jaxserve.config import ModelConfig
from jaxserve.perf import energy
from jaxserve.perf.plan import plan
from jaxserve.perf.precision import Precision
from jaxserve.perf.profiles import Energy, load_hardware
from jaxserve.perf.serving import Operating
from jaxserve.perf.step import Chunk, Deployment
from jaxserve.perf.workload import Workload

# embed 16, 4 query heads and 2 KV heads of 4, MLP 32, 2 layers, vocabulary 100
TINY = ModelConfig(family="llama", vocab_size=100, hidden_size=16, intermediate_size=32,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                   max_position_embeddings=64)
FIGURES = Energy(per_flop={"float32": 2e-12, "bfloat16": 1e-12, "float16": 1e-12,
                           "float8": 5e-13, "int8": 5e-13},
                 per_memory_byte=1e-10, per_intra_host_byte=3e-11, per_inter_host_byte=5e-11)


def device(per_host: int = 8):
    return dataclasses.replace(load_hardware("h100"), energy=FIGURES, devices_per_host=per_host)


# tp=2 on 8 tokens, float32: all-reduces of [8 tokens, 16] x 4 bytes = 512 bytes after o_proj
# and down_proj in each of 2 layers and after the vocabulary-split embedding (5 calls; a ring
# of 2 sends 2 (n - 1) / n = 1 x the tensor per device), and the sampled row's 100 logits
# gathered (400 bytes, each device sends (n - 1) / n = half): 5 x 512 + 200 bytes per device
SENT_PER_DEVICE = 5 * 512 + 200


@pytest.mark.parametrize("per_host,link_j", [(8, 3e-11), (1, 5e-11)])
def test_step_joules_are_flops_bytes_and_link_traffic_times_their_figures(per_host, link_j):
    d = Deployment(TINY, "tp=2", "tp", device(per_host), Precision("float32"))
    step = d.step([Chunk(0, 8)])
    j = energy.step_joules(d, step)
    # two devices, each doing its share of the FLOPs and bytes the step counts
    assert j.compute == pytest.approx(2 * step.flops * 2e-12)
    assert j.memory == pytest.approx(2 * step.bytes * 1e-10)
    # one device per host: the same bytes cross the between-hosts link instead
    assert j.interconnect == pytest.approx(2 * SENT_PER_DEVICE * link_j)
    assert j.total == pytest.approx(j.compute + j.memory + j.interconnect)


def test_per_output_token_divides_all_replicas_by_the_tokens_a_step_yields():
    d = Deployment(TINY, "dp=2", "dp", device(), Precision("bfloat16"))
    step = d.step([Chunk(0, 8, 3)])
    one = energy.step_joules(d, step)
    assert one.interconnect == 0  # replicas exchange nothing
    assert one.compute == pytest.approx(step.flops * 1e-12)
    # 12 output tokens per step, both replicas together
    op = Operating(batch=6, step=step, tpot_s=step.total_s, ttft_s=step.total_s,
                   output_tokens_per_s=12 / step.total_s, requests_per_s=3 / step.total_s,
                   limited_by="max_num_seqs")
    per_token = energy.per_output_token(d, op)
    assert per_token.total == pytest.approx(2 * one.total / 12)
    assert energy.prefill_per_request(d, op).total == pytest.approx(2 * one.total / 3)


def test_a_profile_without_energy_figures_gives_none():
    d = Deployment(TINY, None, "tp", load_hardware("a100-80gb"), Precision("bfloat16"))
    assert energy.step_joules(d, d.step([Chunk(0, 4)])) is None


def test_plan_prints_joules_per_token_next_to_cost():
    w = Workload.from_dict({"prompt_len": 32, "output_len": 16, "max_num_seqs": 8,
                            "max_num_batched_tokens": 256})
    result = plan(TINY, 2, device(), w, Precision("bfloat16"))
    assert all(c.joules_per_token is not None for c in result.candidates)
    best = result.candidates[0]
    j = best.joules_per_token
    assert j["total"] == pytest.approx(j["compute"] + j["memory"] + j["interconnect"])
    table = result.table()
    assert "$/M tok" in table and "mJ/tok (FLOP/HBM/link)" in table
    assert f"{j['total'] * 1e3:.3g} (" in table
    none = plan(TINY, 2, load_hardware("a100-80gb"), w, Precision("bfloat16"))
    assert all(c.joules_per_token is None for c in none.candidates)


def test_the_energy_figures_of_the_profiles_cite_a_source():
    """Each profile with energy figures says where each came from (`energy:` sources naming
    the pJ/bit and the TDP they rest on)."""
    for name in ("h100", "h200"):
        hw = load_hardware(name)
        cited = " ".join(s for s in hw.sources if s.startswith("energy:"))
        assert "700 W" in cited and "8 pJ/bit" in cited and "5.5 pJ/bit" in cited
        assert hw.energy.per_memory_byte == pytest.approx(8e-12 * 8)  # 8 pJ/bit
        assert hw.energy.per_intra_host_byte == pytest.approx(5.5e-12 * 8)
        hbm_watts = 3.35e12 * hw.energy.per_memory_byte  # the H100's HBM at full bandwidth
        assert hw.energy.per_flop["bfloat16"] == pytest.approx(
            (700 - hbm_watts) / hw.peak_flops["bfloat16"], rel=1e-3)
