"""DeepSeek-V2/V3 (latent attention, shared experts, grouped routing): HF parity on several
meshes, greedy generate (again through a prefix cache hit, and under preemption), absorbed ==
expanded attention and the latent cache in int8, and config fields we do not implement refused
by name."""

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ConfigError, from_hf_config
from tests.hf_models import HF_CONFIGS, hf_logits
from tests.test_engine import hf_greedy
from tests.test_parity import assert_close_to_reference

PROMPTS = [[1, 5, 9, 100, 3, 77, 40, 12, 8, 8, 8, 31], list(range(2, 47))]
SMALL = dict(max_num_seqs=3, max_model_len=128, block_size=16)


@pytest.fixture(scope="module")
def v3(hf_model_dir):
    hf_dir, model_dir = hf_model_dir("deepseek_v3")
    return hf_dir, LLM(model_dir, kv_blocks=16, **SMALL)


def test_v3_logits_match_hf(v3):
    """q_lora_rank, YaRN (attention factor and mscale), sigmoid routing with its bias."""
    hf_dir, llm = v3
    for prompt, logits in zip(PROMPTS, llm.logits(PROMPTS)):
        assert logits.shape == (len(prompt), 128)
        assert_close_to_reference(logits, hf_logits(hf_dir, prompt))


def test_v3_greedy_generate_matches_hf_and_again_from_the_prefix_cache(v3):
    hf_dir, llm = v3
    # 20 tokens: the second prefill (4 tokens past the cached block) has the first's shape
    prompt = np.random.default_rng(5).integers(3, 128, size=20).tolist()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = hf_greedy(hf_dir, prompt, 8)
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == want
    hits = llm.stats()["prefix_cache_hits"]
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == want
    assert llm.stats()["prefix_cache_hits"] > hits  # its first 16 tokens' latents reused


def test_v3_preempts_on_its_small_pool_and_gives_the_unpreempted_tokens(v3):
    """Three sequences of 80-88 tokens need 18 latent blocks of the pool's 15: one is
    preempted and recomputed (the prompts' first blocks from the prefix cache the runs alone
    left), and every token is the one each sequence got alone. (Prompts of 40-48 tokens: the
    runs alone and the recompute share one prefill shape, each shape a program to compile.)"""
    _, llm = v3
    rng = np.random.default_rng(7)
    batch = [rng.integers(3, 128, size=n).tolist() for n in (40, 44, 48)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in batch]
    before = llm.stats()
    outs = llm.generate(batch, params, use_tqdm=False)
    after = llm.stats()
    assert after["preemptions"] > before["preemptions"]
    assert after["prefix_cache_hits"] > before["prefix_cache_hits"]
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert after["kv_blocks_used"] == 0


@pytest.mark.parametrize("family,mesh,rules", [("deepseek_v2", "tp=2,ep=2", "tp_ep"),
                                               ("deepseek_v3", "dp=2,tp=2", "dp_tp")])
def test_logits_match_hf_on_a_mesh(hf_model_dir, family, mesh, rules):
    """V2 (no q_lora_rank, group-limited softmax routing) with heads and experts split; V3
    with replicas and heads split. Both meet HF, so both equal the single-device model."""
    hf_dir, model_dir = hf_model_dir(family)
    llm = LLM(model_dir, mesh=mesh, rules=rules, kv_blocks=16, **SMALL)
    for prompt, logits in zip(PROMPTS, llm.logits(PROMPTS)):
        assert_close_to_reference(logits, hf_logits(hf_dir, prompt))


@pytest.mark.parametrize("family,mesh,rules", [("deepseek_v2", "tp=2", "tp"),
                                               ("deepseek_v3", "ep=4", "ep"),
                                               ("deepseek_v2", "dp=2", "dp"),
                                               ("deepseek_v3", "dp=2,ep=2", "dp_ep")])
def test_every_other_rules_file_meets_hf(hf_model_dir, family, mesh, rules):
    """The rules files the test above leaves out, on the prompt that spans three blocks (one
    prompt: one program per mesh). HF is the oracle the single-device model meets too."""
    hf_dir, model_dir = hf_model_dir(family)
    llm = LLM(model_dir, mesh=mesh, rules=rules, kv_blocks=16, **SMALL)
    (logits,) = llm.logits(PROMPTS[1:])
    assert_close_to_reference(logits, hf_logits(hf_dir, PROMPTS[1]))


def _random_step(seed=0, heads=4, latent=32, nope=16, rope=8, v=16, block_size=4):
    """A prefill chunk of 11 tokens and two decode rows, over scattered blocks."""
    import jax.numpy as jnp

    from jaxserve.kv_cache import KVFormat, KVPool
    from jaxserve.models.deepseek import latent_cache_spec
    from jaxserve.ops.attention import ChunkRow, build_metadata, table_width
    from jaxserve.config import ModelConfig

    config = ModelConfig(family="deepseek_v3", vocab_size=8, hidden_size=8, intermediate_size=8,
                         num_layers=1, num_heads=heads, num_kv_heads=heads, head_dim=nope + rope,
                         max_position_embeddings=64, num_experts=2, num_experts_per_tok=1,
                         moe_intermediate_size=4, kv_lora_rank=latent, qk_nope_head_dim=nope,
                         qk_rope_head_dim=rope, v_head_dim=v)
    spec = latent_cache_spec(config, jnp.float32)
    decodes = [ChunkRow(6, 1, [5, 2]), ChunkRow(9, 1, [7, 1, 8])]
    chunks = [ChunkRow(0, 11, [3, 4, 6])]
    md, _ = build_metadata([(decodes, chunks)], 2, 16, 16, block_size, table_width(3, block_size))
    tokens = md.positions.shape[0]
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    args = (normal(tokens, heads, nope), normal(tokens, heads, rope), normal(tokens, latent),
            normal(tokens, rope), normal(latent, heads, nope) * 0.2, normal(latent, heads, v))
    # the decode rows' earlier context is already in the pool
    pool = KVPool.create_local(spec.with_format(KVFormat("float32", "float32")), 10, block_size)
    return args, {name: normal(*a.shape) for name, a in pool.layer(0).items()}, md


def test_absorbed_attention_equals_expanded():
    """W_UK folded into the query and W_UV into the output, against per-token keys/values:
    decode rows and a prefill tile, reading context the pool held and context the step wrote."""
    import jax

    from jaxserve.kv_cache import encode_buffers, kv_formats
    from jaxserve.ops.latent_attention import latent_attention

    args, cache, md = _random_step()
    int8 = kv_formats()["int8"]

    @jax.jit
    def attend(args, cache, md):
        outs = [latent_attention(*args, cache, md, 0.3, absorb=absorb)
                for absorb in (True, False)]
        quantized = latent_attention(*args, encode_buffers(int8, cache), md, 0.3)
        return outs[0][0], outs[1][0], quantized

    absorbed, expanded, (quantized, pages) = attend(args, cache, md)
    real = np.asarray(md.positions) >= 0
    absorbed, expanded = np.asarray(absorbed)[real], np.asarray(expanded)[real]
    np.testing.assert_allclose(absorbed, expanded, rtol=0, atol=1e-5)
    assert np.abs(absorbed).max() > 0.1  # not trivially 0
    # the int8 latent cache: values and a scale per token and buffer, within int8's rounding
    assert {name: (a.shape[2:], a.dtype.name) for name, a in pages.items()} == {
        "c_kv": ((32,), "int8"), "k_pe": ((8,), "int8"),
        "c_kv_scale": ((), "bfloat16"), "k_pe_scale": ((), "bfloat16")}
    err = np.abs(np.asarray(quantized)[real] - absorbed).max() / np.abs(absorbed).max()
    assert 1e-5 < err < 2e-2, err  # per-token int8: ~0.4% of a vector's max (kv_cache.py)


def test_int8_weights_quantize_w_uk_and_w_uv_too(v3):
    """Under quantization="int8" the up-projections W_UK / W_UV [latent, heads, 16] are int8 in
    the step like every other projection (two per layer), and the logits stay within int8's
    rounding of the float model's."""
    import jax.numpy as jnp

    _, mla = v3
    int8 = LLM(mla.model_dir, quantization="int8", kv_blocks=16, **SMALL)
    up_projections = [a for a in int8.runner.param_leaves
                      if a.dtype == jnp.int8 and a.shape == (32, 4, 16)]
    assert len(up_projections) == 2 * int8.config.num_layers
    for a, b in zip(int8.logits(PROMPTS), mla.logits(PROMPTS)):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert 1e-5 < err < 3e-2, err


def test_the_decode_step_absorbs_and_long_tiles_expand():
    from jaxserve.ops.latent_attention import absorbs

    assert absorbs(1, 512, 128, 128) and absorbs(16, 512, 128, 128)  # V3's sizes, the engine's
    assert not absorbs(256, 512, 128, 128)
    assert absorbs(32, 32, 16, 16) and not absorbs(33, 32, 16, 16)


# ---- TPLA: the latent split over tp ----

def test_tpla_at_tp1_with_the_hadamard_transform_equals_mla(v3):
    """One slice of the latent is the whole: exact, with the transform folded into the
    weights (kv_a_proj rotated, the norm's scale moved into W_UK / W_UV)."""
    hf_dir, mla = v3
    tpla = LLM(mla.model_dir, attention="tpla", latent_transform="hadamard", kv_blocks=16,
               **SMALL)
    assert tpla.config.latent_attention == "tpla"
    for a, b in zip(tpla.logits(PROMPTS), mla.logits(PROMPTS)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_hadamard_makes_the_tpla_split_closer_to_exact_at_tp2(hf_model_dir, v3_with_tokenizer):
    """At tp=2 each device's softmax sees half the latent: an approximation (its logit error
    is far above float rounding), which the Hadamard transform makes smaller on this seeded
    model, in the worst and the mean logit, and so does PCA (from the shipped calibration text,
    through a one-id-per-character tokenizer); tpla-decode's prefill stays exact on the same
    split cache."""
    hf_dir, model_dir = hf_model_dir("deepseek_v3")
    refs = [hf_logits(hf_dir, p) for p in PROMPTS]
    errors = {}
    for attention, transform in [("tpla", "none"), ("tpla", "hadamard"), ("tpla", "pca"),
                                 ("tpla-decode", "hadamard")]:
        llm = LLM(v3_with_tokenizer, mesh="tp=2", attention=attention, latent_transform=transform,
                  kv_blocks=16, **SMALL)
        diffs = [np.abs(ours - ref) / np.abs(ref).max()
                 for ours, ref in zip(llm.logits(PROMPTS), refs)]
        errors[attention, transform] = (max(d.max() for d in diffs),
                                        np.mean([d.mean() for d in diffs]))
    print(errors)
    none, hadamard = errors["tpla", "none"], errors["tpla", "hadamard"]
    assert hadamard[0] < none[0] and hadamard[1] < none[1]
    pca = errors["tpla", "pca"]
    assert pca[0] < none[0] and pca[1] < none[1]
    assert hadamard[0] > 1e-3  # really split
    assert errors["tpla-decode", "hadamard"][0] <= 1e-4


def test_tpla_on_a_model_without_a_latent_is_an_error_naming_it(hf_model_dir):
    _, model_dir = hf_model_dir("llama")
    with pytest.raises(ConfigError, match=r"attention='tpla'.*family 'llama' has none"):
        LLM(model_dir, mesh="tp=2", attention="tpla")


def test_a_tp_degree_that_does_not_divide_the_latent_is_an_error_naming_it():
    import dataclasses

    from jaxserve.placement import fit_to_layout
    from jaxserve.rules import MeshRules, ShardingError

    config = dataclasses.replace(from_hf_config(_hf_config("deepseek_v3", kv_lora_rank=30)),
                                 latent_attention="tpla")
    with pytest.raises(ShardingError, match=r"'latent' has size 30 \(the model's kv_lora_rank\)"
                                            r".*'tp' of size 4.*1, 2, 3, 5, 6, 10, 15, 30"):
        fit_to_layout(config, MeshRules.create("tp=4", "tpla"))
    with pytest.raises(ConfigError, match="kv_lora_rank a power of two, got 30"):
        from jaxserve.ops.latent_transform import transform_matrix
        transform_matrix(config, "hadamard")


# ---- the PCA transform: principal axes of the latent on a calibration text ----

@pytest.fixture(scope="module")
def v3_with_tokenizer(v3, tmp_path_factory):
    """The V3 test model with a one-id-per-character tokenizer of the calibration text."""
    from jaxserve.bench.tpla import with_char_tokenizer
    from jaxserve.package_data import latent_calibration_text

    return with_char_tokenizer(v3[1].model_dir, tmp_path_factory.mktemp("v3_tok") / "model",
                               [latent_calibration_text().read_text()])


def test_pca_is_orthogonal_and_deals_the_variance_evenly_over_the_slices():
    from jaxserve.ops.latent_transform import pca_rotation

    rng = np.random.default_rng(0)
    scales = 2.0 ** -np.arange(8)  # a latent whose energy sits in its first dims
    latents = rng.standard_normal((4000, 8)) * scales @ np.linalg.qr(rng.standard_normal((8, 8)))[0]
    r = pca_rotation(latents, slices=2)
    np.testing.assert_allclose(r.T @ r, np.eye(8), atol=1e-12)
    variance = (latents @ r).var(axis=0)
    # the k-th largest principal axis lands in slice k % 2: columns 0, 4, 1, 5, ... by size
    assert np.all(np.diff(variance[[0, 4, 1, 5, 2, 6, 3, 7]]) < 0)
    np.testing.assert_allclose(variance, np.sort(np.concatenate(
        [scales[0::2], scales[1::2]]) ** 2)[::-1][[0, 2, 4, 6, 1, 3, 5, 7]], rtol=0.1)


def test_the_calibration_latents_are_the_models_latents_of_the_text(v3, v3_with_tokenizer):
    """What the PCA is taken of: per layer, the exact model's c_kv of every calibration token
    (read back from the pool), as HF's kv_a_layernorm computes it."""
    import torch

    from jaxserve.api import CALIBRATION_TOKENS, calibration_latents
    from jaxserve.package_data import latent_calibration_text
    from jaxserve.settings import ParallelSettings
    from jaxserve.text.load import load_tokenizer
    from tests.hf_models import _load

    latents = calibration_latents(v3_with_tokenizer, ParallelSettings(), None)
    ids = load_tokenizer(v3_with_tokenizer).encode(latent_calibration_text().read_text())
    model = _load(v3[0])
    tokens = min(len(ids), CALIBRATION_TOKENS, model.config.max_position_embeddings)
    assert latents.shape == (len(model.model.layers), tokens, model.config.kv_lora_rank)
    seen = []
    hooks = [layer.self_attn.kv_a_layernorm.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0].numpy())) for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([ids[:latents.shape[1]]]))
    for hook in hooks:
        hook.remove()
    np.testing.assert_allclose(latents, np.stack(seen), rtol=0, atol=1e-4)


def test_tpla_at_tp1_with_the_pca_transform_equals_mla(v3, v3_with_tokenizer):
    _, mla = v3
    tpla = LLM(v3_with_tokenizer, attention="tpla", latent_transform="pca", kv_blocks=16,
               **SMALL)
    assert tpla.config.latent_transform == "pca"
    for a, b in zip(tpla.logits(PROMPTS), mla.logits(PROMPTS)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_a_missing_or_unreadable_calibration_text_is_an_error_naming_it(v3, v3_with_tokenizer,
                                                                        tmp_path):
    args = dict(attention="tpla", latent_transform="pca", kv_blocks=16, **SMALL)
    missing = tmp_path / "no-such.txt"
    with pytest.raises(FileNotFoundError, match=f"latent_calibration: no such file: {missing}"):
        LLM(v3_with_tokenizer, latent_calibration=str(missing), **args)
    binary = tmp_path / "latents.bin"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ValueError, match=f"latent_calibration {binary} is not UTF-8"):
        LLM(v3_with_tokenizer, latent_calibration=str(binary), **args)
    with pytest.raises(ValueError, match=r"latent_calibration .*latent_calibration.txt: .* has "
                                         r"no tokenizer"):
        LLM(v3[1].model_dir, **args)


# ---- config fields ----

def _hf_config(family, **changes):
    _, _, kwargs = HF_CONFIGS[family]
    hf = {k: v for k, v in kwargs.items() if k != "rope_parameters"}
    hf.update(model_type=family, num_hidden_layers=3, num_attention_heads=4)
    return {**hf, **changes}


@pytest.mark.parametrize("family,field,value,match", [
    ("deepseek_v2", "topk_method", "noaux_tc", r"topk_method='noaux_tc'"),
    ("deepseek_v3", "topk_method", "greedy", r"topk_method='greedy'"),
    ("deepseek_v2", "scoring_func", "sigmoid", r"scoring_func='sigmoid'"),
    ("deepseek_v3", "moe_layer_freq", 2, r"moe_layer_freq=2"),
    ("deepseek_v2", "norm_topk_prob", True, r"norm_topk_prob=True"),
    ("deepseek_v3", "attention_bias", True, r"attention_bias=True"),
    ("deepseek_v3", "n_group", 3, r"n_group.*num_experts \(8\).*3"),
    ("deepseek_v2", "topk_group", 5, r"topk_group.*n_group=4.*5"),
    ("deepseek_v3", "rope_parameters", {"rope_type": "yarn", "factor": 2.0,
                                        "original_max_position_embeddings": 64, "beta": 3},
     r"\['beta'\].*yarn"),
    ("deepseek_v3", "use_mla_kernel", True, r"unsupported field\(s\) \['use_mla_kernel'\]"),
])
def test_config_fields_that_change_the_math_are_refused_by_name(family, field, value, match):
    with pytest.raises(ConfigError, match=match):
        from_hf_config(_hf_config(family, **{field: value}))


def test_flops_of_latent_attention_match_a_hand_count():
    from jaxserve import flops

    c = from_hf_config(_hf_config("deepseek_v3", q_lora_rank=48))
    # q: 64x48 + 48x(4x24); latent + rope key 64x40; W_UK, W_UV 4x32x(16+16); o 4x16x64
    assert flops.attention_projection_flops(c) == 2 * (
        64 * 48 + 48 * 96 + 64 * 40 + 4 * 32 * 32 + 64 * 64)
    # positions 0, 1: 1 + 2 keys, 4 heads, scores over 32 + 8 dims and values over 32, 3 layers
    assert flops.attention_score_flops(c, 0, 2) == 3 * 2 * 4 * (2 * 32 + 8) * 3


def test_flops_of_a_moe_layer_count_its_shared_experts():
    from jaxserve import flops

    c = from_hf_config(_hf_config("deepseek_v3"))  # layer 0 dense, layers 1 and 2 MoE
    swiglu = lambda width: 2 * 3 * 64 * width  # noqa: E731
    # the router over 8 experts, the token's 2 experts and the 1 shared expert, each 16 wide
    assert flops.mlp_flops(c, 1) == 2 * 64 * 8 + 2 * swiglu(16) + swiglu(16)
    assert flops.mlp_flops(c, 0) == swiglu(128)
    assert flops.dense_flops_per_token(c) == (3 * flops.attention_projection_flops(c)
                                              + swiglu(128) + 2 * flops.mlp_flops(c, 1))


def test_the_performance_model_sizes_the_latent_cache_and_its_tpla_split():
    from jaxserve.perf.precision import Precision
    from jaxserve.perf.profiles import load_hardware
    from jaxserve.perf.step import Deployment

    config = from_hf_config(_hf_config("deepseek_v3", q_lora_rank=48))
    per_token = {rules: Deployment(config, "tp=2", rules, load_hardware("cpu-local"),
                                   Precision("float32")).kv_bytes_per_token
                 for rules in ("tp", "tpla")}
    # 3 layers x (latent 32 + rope key 8) x 4 bytes; TPLA halves the latent, not the rope key
    assert per_token == {"tp": 3 * 40 * 4, "tpla": 3 * (16 + 8) * 4}


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_the_parameter_count_is_the_models(family):
    import math

    from jaxserve.checkpoint import param_specs

    config = from_hf_config(_hf_config(family, q_lora_rank=48 if family == "deepseek_v3"
                                       else None))
    assert config.num_params() == sum(math.prod(shape)
                                      for shape, _ in param_specs(config).values())


def test_dense_first_layers_and_routing_fields_are_read():
    v2 = from_hf_config(_hf_config("deepseek_v2", first_k_dense_replace=2))
    assert [v2.moe_layer(i) for i in range(3)] == [False, False, True]
    assert (v2.topk_method, v2.n_group, v2.topk_group, v2.routed_scaling_factor) == (
        "group_limited_greedy", 4, 2, 1.5)
    assert v2.head_dim == 24 and v2.num_kv_heads == 4 and v2.q_lora_rank is None
    v3 = from_hf_config(_hf_config("deepseek_v3", q_lora_rank=48, num_key_value_heads=128))
    assert v3.topk_method == "noaux_tc" and v3.q_lora_rank == 48 and v3.num_kv_heads == 4
