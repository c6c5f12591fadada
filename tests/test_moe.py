"""Mixture-of-experts models: HF parity under every strategy and EP mesh, nothing dropped under
skewed routing, the collectives each strategy compiles to, greedy generate, FLOPs accounting."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from jaxserve import LLM, SamplingParams, flops
from jaxserve.config import ModelConfig
from jaxserve.engine.accounting import step_true_flops
from jaxserve.ops.moe import MoEExecution
from jaxserve.sharding import ShardingError
from tests.hf_models import _load, hf_logits
from tests.test_engine import hf_greedy
from tests.test_parity import PROMPTS, assert_close_to_reference

MESHES = [(None, "tp"), ("ep=2", "ep"), ("ep=4", "ep"), ("ep=8", "ep"), ("tp=2,ep=2", "tp_ep"),
          ("dp=2,ep=2", "dp_ep")]
# alltoall also with the ragged exchange (emulated on CPU: it checks the offsets bookkeeping)
EXECUTIONS = {"dense": MoEExecution("dense"), "alltoall": MoEExecution("alltoall"),
              "alltoall-ragged": MoEExecution("alltoall", exchange="ragged"),
              "allgather": MoEExecution("allgather")}
SMALL = dict(kv_blocks=48, max_num_seqs=4, max_model_len=128)


def logits_by_strategy(llm, prompts):
    out = {}
    for name, execution in EXECUTIONS.items():
        llm.runner.set_moe(execution)
        out[name] = llm.logits(prompts)
    return out


@pytest.mark.parametrize("family,mesh,rules", [
    *[("qwen3_moe", m, r) for m, r in MESHES],
    *[("mixtral", m, r) for m, r in MESHES],
    ("qwen3_moe_sparse", None, "tp"), ("qwen3_moe_sparse", "tp=2,ep=2", "tp_ep")],
    ids=lambda v: v if isinstance(v, str) else "single")
def test_logits_match_hf_under_every_strategy(hf_model_dir, family, mesh, rules):
    hf_dir, model_dir = hf_model_dir(family)
    llm = LLM(model_dir, mesh=mesh, rules=rules, **SMALL)
    refs = [hf_logits(hf_dir, p) for p in PROMPTS]
    for strategy, ours in logits_by_strategy(llm, PROMPTS).items():
        for logits, ref in zip(ours, refs):
            assert logits.shape == ref.shape, strategy
            assert_close_to_reference(logits, ref)


def hf_router_choices(hf_dir, prompt):
    model = _load(hf_dir)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    return [set(map(int, torch.topk(r, k, dim=-1).indices.flatten().tolist()))
            for r in out.router_logits]


@pytest.mark.parametrize("mesh,rules", [("ep=8", "ep"), ("tp=2,ep=2", "tp_ep")])
def test_skewed_routing_drops_nothing(hf_model_dir, mesh, rules):
    """Every token of a repeated-token prompt picks the same experts (checked in HF's router):
    one device gets all the pairs, the worst case for a fixed-capacity exchange."""
    hf_dir, model_dir = hf_model_dir("qwen3_moe")
    prompt = [11] * 40
    assert all(len(chosen) == 2 for chosen in hf_router_choices(hf_dir, prompt))
    llm = LLM(model_dir, mesh=mesh, rules=rules, **SMALL)
    ref = hf_logits(hf_dir, prompt)
    results = logits_by_strategy(llm, [prompt])
    for name in EXECUTIONS:
        assert_close_to_reference(results[name][0], ref)
        np.testing.assert_allclose(results[name][0], results["dense"][0], rtol=0, atol=1e-5)


def collectives(hlo: str) -> dict[str, list[str]]:
    """op name -> result shapes of each all-gather / all-to-all in compiled HLO text."""
    found: dict[str, list[str]] = {"all-gather": [], "all-to-all": []}
    for shape, op in re.findall(r"^\s*%\S+ = (.+?) (all-gather|all-to-all)(?:-start)?\(", hlo,
                                re.MULTILINE):
        found[op].append(re.sub(r"\{[^}]*\}", "", shape))  # drop layouts: f32[8,64,32]
    return found


def test_each_strategy_compiles_to_its_collectives(hf_model_dir):
    _, model_dir = hf_model_dir("qwen3_moe")
    llm = LLM(model_dir, mesh="ep=4", rules="ep", **SMALL)
    config = llm.config
    e, m, n = config.hidden_size, config.moe_intermediate_size, config.num_experts
    gathered = {f"f32[{n},{e},{m}]", f"f32[{n},{m},{e}]"}  # whole experts on one device
    inputs = llm.engine.builder.idle(0, 64)  # a prefill step
    texts = {}
    for strategy in ("allgather", "alltoall"):
        llm.runner.set_moe(MoEExecution(strategy))
        texts[strategy] = collectives(llm.runner.compiled_step(inputs).as_text())
    ag, a2a = texts["allgather"], texts["alltoall"]
    # one MoE layer (layer 1 is dense): its gate, up and down weights gathered
    assert sorted(s for s in ag["all-gather"] if s in gathered) == sorted(
        [f"f32[{n},{e},{m}]"] * 2 + [f"f32[{n},{m},{e}]"])
    assert ag["all-to-all"] == []
    assert len(a2a["all-to-all"]) >= 3  # tokens and their expert ids out, results back
    assert not [s for s in a2a["all-gather"] if s in gathered]


@pytest.mark.parametrize("rows,tile", [(40, 8), (300, 32)])
def test_expert_tiles_equal_ragged_dot(rows, tile):
    """The two grouped-matmul implementations, with rows that belong to no expert (id 6)."""
    import jax.numpy as jnp

    from jaxserve.ops import moe

    rng = np.random.default_rng(rows)
    w = moe.ExpertWeights(*(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
                            [(6, 16, 24), (6, 16, 24), (6, 24, 16)]))
    x = jnp.asarray(rng.standard_normal((rows, 16)), jnp.float32)
    expert = jnp.asarray(rng.integers(0, 7, rows), jnp.int32)
    ragged = np.asarray(moe._grouped_ragged(x, expert, w))
    tiled = np.asarray(moe._grouped_tiled(x, expert, w, tile))
    assert np.all(ragged[np.asarray(expert) == 6] == 0)
    np.testing.assert_allclose(tiled, ragged, rtol=1e-5, atol=1e-4)


def test_auto_picks_by_tokens_per_step():
    auto = MoEExecution("auto", auto_threshold=100)
    assert auto.resolve(100) == "alltoall" and auto.resolve(101) == "allgather"
    assert MoEExecution("dense").resolve(10_000) == "dense"
    with pytest.raises(ValueError, match="'ragged'"):
        MoEExecution("ragged")
    with pytest.raises(ValueError, match="-1"):
        MoEExecution("auto", auto_threshold=-1)
    with pytest.raises(ValueError, match="'sparse'"):
        MoEExecution("alltoall", exchange="sparse")
    assert MoEExecution().token_exchange() == "fixed"  # XLA:CPU has no ragged all-to-all


@pytest.mark.parametrize("mesh,rules", [(None, "tp"), ("ep=2", "ep"), ("tp=2,ep=2", "tp_ep")])
def test_greedy_generate_matches_hf(hf_model_dir, mesh, rules):
    hf_dir, model_dir = hf_model_dir("qwen3_moe")
    rng = np.random.default_rng(3)
    batch = [rng.integers(3, 512, size=n).tolist() for n in (5, 23, 40)]
    llm = LLM(model_dir, mesh=mesh, rules=rules, moe_auto_threshold=32, **SMALL)
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_dir, prompt, 12)


def test_experts_the_mesh_cannot_split_are_an_error_naming_what_works(hf_model_dir):
    _, model_dir = hf_model_dir("mixtral")
    with pytest.raises(ShardingError, match=r"'experts' has size 8.*'ep' of size 3.*1, 2, 4, 8"):
        LLM(model_dir, mesh="ep=3", rules="ep", **SMALL)


def test_hf_moe_config_fields_are_read_in_both_dialects():
    from jaxserve.config import ConfigError, from_hf_config

    base = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2,
                mlp_only_layers=[3], norm_topk_prob=True)
    for experts_field in ("num_experts", "num_local_experts"):
        config = from_hf_config({**base, experts_field: 6})
        assert config.num_experts == 6 and config.norm_topk_prob
        assert [config.moe_layer(i) for i in range(4)] == [False, True, False, False]
    with pytest.raises(ConfigError, match="num_experts"):
        from_hf_config(base)
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(8\)"):
        from_hf_config({**base, "num_experts": 6, "num_experts_per_tok": 8})


# ---- FLOPs ----

TINY_MOE = ModelConfig(family="qwen3_moe", vocab_size=100, hidden_size=8, intermediate_size=12,
                       num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
                       max_position_embeddings=64, qk_norm=True, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=6, mlp_only_layers=(1,))


def test_flops_match_a_hand_count():
    c = TINY_MOE
    # per token and layer: q (8x2x4) + k, v (8x1x4 each) + o (2x4x8) = 64 + 32 + 32 + 64 MACs
    projections = 2 * (64 + 32 + 32 + 64)
    moe_layer = 2 * 8 * 4 + 2 * (2 * 3 * 8 * 6)  # router + 2 experts of 3 [8x6] matmuls
    dense_layer = 2 * 3 * 8 * 12
    assert flops.dense_flops_per_token(c) == 2 * projections + moe_layer + dense_layer
    # tokens at positions 3, 4, 5 see 4 + 5 + 6 keys; scores and values, 2 heads x 4, 2 layers
    assert flops.attention_score_flops(c, 3, 6) == 2 * 2 * 2 * (2 * 4) * (4 + 5 + 6)
    assert flops.chunk_flops(c, 3, 6, logit_rows=1) == (
        3 * flops.dense_flops_per_token(c) + flops.attention_score_flops(c, 3, 6)
        + 2 * 8 * 100)
    dense = dataclasses.replace(c, family="qwen3", num_experts=0, num_experts_per_tok=0,
                                moe_intermediate_size=0, mlp_only_layers=())
    assert flops.dense_flops_per_token(dense) == 2 * projections + 2 * dense_layer


def test_stats_report_true_and_executed_flops(hf_model_dir):
    _, model_dir = hf_model_dir("qwen3_moe")
    llm = LLM(model_dir, **SMALL)
    plans = []
    real_record = llm.engine.flops.record

    def record(plan, inputs):
        plans.append(step_true_flops(llm.config, plan))
        return real_record(plan, inputs)

    llm.engine.flops.record = record
    prompt = list(range(3, 30))
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    stats = llm.stats(peak_flops=1e12)
    c = llm.config
    # one prefill of 27 tokens with its sample row, then 3 decodes at positions 27, 28, 29
    expected = flops.chunk_flops(c, 0, 27, 1) + sum(flops.chunk_flops(c, p, p + 1, 1)
                                                    for p in (27, 28, 29))
    assert stats["true_flops"] == expected == sum(plans)
    # padding (27 -> 32 tokens, 1 -> 4 decode rows... ) and grouped matmuls: more executed
    assert stats["executed_flops"] > stats["true_flops"]
    assert 0 < stats["useful_fraction"] < 1 and 0 < stats["mfu"] < 1
    with pytest.raises(ValueError, match="peak_flops.*-5"):
        llm.stats(peak_flops=-5)


def test_scoring_steps_count_their_flops(hf_model_dir):
    _, model_dir = hf_model_dir("mixtral")
    llm = LLM(model_dir, **SMALL)
    prompt, candidate = list(range(3, 13)), [40, 41, 42]
    [out] = llm.score([prompt], [candidate])
    assert len(out.candidates) == 1
    # under one block: one branch, prompt + candidate[:-1] from position 0, 3 rows scored
    true = flops.chunk_flops(llm.config, 0, len(prompt) + 2, 3)
    stats = llm.stats()
    assert stats["true_flops"] == true and stats["executed_flops"] > true


@pytest.mark.parametrize("mesh,rules", [("ep=4", "ep"), ("dp=2,ep=2", "dp_ep")])
def test_auto_threshold_is_the_models_crossover_and_plan_predicts_the_engine(
        tmp_path, mesh, rules):
    """One rule for both: the engine's threshold is the performance model's crossover for this
    model and mesh on the local profile, and the model's `auto` picks what the engine runs.
    Experts wide enough that gathering them is not free: the crossover lies inside the range."""
    from jaxserve.checkpoint import convert_hf
    from jaxserve.perf.precision import Precision
    from jaxserve.perf.profiles import load_hardware
    from jaxserve.perf.step import Chunk, Deployment
    from tests.hf_models import make_hf_model

    hf_dir = make_hf_model("qwen3_moe", tmp_path / "hf", hidden_size=256,
                           moe_intermediate_size=256)
    model_dir = tmp_path / "jaxserve"
    convert_hf(hf_dir, model_dir, dtype="float32")
    llm = LLM(model_dir, mesh=mesh, rules=rules, compilation="on_use", **SMALL)
    d = Deployment(llm.config, mesh, rules, load_hardware("cpu-local"), Precision("float32"))
    assert llm.runner.moe.token_exchange() == d.moe_exchange == "fixed"  # XLA:CPU's exchange
    crossover = d.moe_crossover_tokens()
    assert llm.runner.moe.auto_threshold == crossover
    assert "crossover" in llm.moe_threshold_source and "cpu-local" in llm.moe_threshold_source
    assert 0 < crossover < 1 << 20  # both strategies win somewhere: the test can tell them apart
    for total in (1, crossover // 2, crossover, crossover + 1, 4 * crossover):
        modelled = d.step([Chunk(0, 1, total / d.replicas)]).moe_strategy
        assert modelled == llm.runner.moe.resolve(total), total
    explicit = LLM(model_dir, mesh=mesh, rules=rules, compilation="on_use",
                   moe_auto_threshold=7, **SMALL)
    assert explicit.runner.moe.auto_threshold == 7
    assert explicit.moe_threshold_source == "moe_auto_threshold"
