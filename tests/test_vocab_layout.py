"""Any vocabulary on any TP degree; KV heads fewer than tp repeated; query heads that cannot split.

Models are tiny random HF Llamas (8 query heads, 2 KV heads) with vocabularies that no mesh
divides (517, 32001), compared with HF transformers on meshes whose `vocab` and head splits need
padding and KV-head copies.
"""

import numpy as np
import pytest
import torch

from jaxserve import LLM, SamplingParams
from jaxserve.checkpoint import convert_hf, flat_params, restore_model
from jaxserve.cli import main as cli_main
from jaxserve.config import ModelConfig
from jaxserve.placement import fit_params, fit_to_layout, unfit_params, working_degrees
from jaxserve.sharding import Layout, ShardingError
from tests.hf_models import hf_logits, make_hf_model

MESHES = [("tp=2", "tp"), ("tp=4", "tp"), ("tp=8", "tp"), ("dp=2,tp=2", "dp_tp")]
MESH_IDS = [m for m, _ in MESHES]
PROMPTS = [[1, 5, 9, 200, 3, 77, 400, 12, 8, 8, 8, 31, 516], [7, 3]]
ENGINE = dict(max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """vocab (and overrides) -> (HF dir, converted jaxserve dir), built once per module."""
    cache = {}

    def get(vocab: int, **overrides):
        key = (vocab, tuple(sorted(overrides.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"vocab{vocab}")
            hf_dir = make_hf_model("llama", root / "hf", vocab_size=vocab, **overrides)
            convert_hf(hf_dir, root / "jaxserve", dtype="float32")
            cache[key] = (hf_dir, root / "jaxserve")
        return cache[key]

    return get


def config(vocab=517, heads=8, kv_heads=2) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                       num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=8,
                       max_position_embeddings=64)


def layout(mesh, rules="tp"):
    return Layout.create(mesh, rules, abstract=True)


def assert_close_to_reference(ours, ref):
    err = np.max(np.abs(ours - ref))
    assert err <= 1e-4 * np.max(np.abs(ref)), f"max |ours - HF| = {err:.3g}"


# ---- the fitted layout ----

@pytest.mark.parametrize("mesh,rules,vocab,rows,copies", [
    ("tp=2", "tp", 517, 518, 1), ("tp=4", "tp", 517, 520, 2), ("tp=8", "tp", 517, 520, 4),
    ("dp=2,tp=2", "dp_tp", 517, 518, 1), ("tp=8", "tp", 32001, 32008, 4),
    ("tp=4", "tp", 512, 512, 2), ("dp=2", "dp", 517, 517, 1), (None, "tp", 517, 517, 1),
])
def test_vocab_padded_and_kv_heads_repeated_to_fit_the_mesh(mesh, rules, vocab, rows, copies):
    base = config(vocab)
    fitted = fit_to_layout(base, layout(mesh, rules))
    assert fitted.vocab_rows == rows and fitted.vocab_size == vocab
    assert fitted.padded_vocab_size == (None if rows == vocab else rows)
    assert fitted.kv_head_copies == copies and fitted.stored_kv_heads == 2 * copies
    assert fitted.to_json_dict() == base.to_json_dict()  # the layout is never saved


def test_enough_kv_heads_are_split_not_repeated():
    assert fit_to_layout(config(kv_heads=8), layout("tp=4")).kv_head_copies == 1
    assert fit_to_layout(config(kv_heads=4), layout("tp=4")).kv_head_copies == 1
    assert fit_to_layout(config(kv_heads=4), layout("tp=8")).kv_head_copies == 2


@pytest.mark.parametrize("h,k,t", [(8, 2, 4), (8, 2, 8), (8, 1, 8), (16, 4, 8), (32, 8, 16),
                                   (8, 4, 8), (12, 3, 6), (8, 8, 4), (8, 2, 2)])
def test_repeated_kv_heads_are_the_ones_each_device_query_heads_read(h, k, t):
    """np.repeat puts on device i exactly the original KV heads its query heads use."""
    fitted = fit_to_layout(config(heads=h, kv_heads=k), layout(f"tp={t}"))
    stored = np.repeat(np.arange(k), fitted.kv_head_copies)  # stored head -> original head
    s = fitted.stored_kv_heads
    assert s % t == 0 and len(stored) == s
    for q in range(h):
        # the fitted model's GQA reads stored head q // q_per_kv: the same original head
        assert stored[q // fitted.q_per_kv] == q // (h // k)
    for i in range(t):  # device i: query heads [i*h/t, (i+1)*h/t), stored heads [i*s/t, ...)
        local = stored[i * s // t:(i + 1) * s // t]
        needed = {q // (h // k) for q in range(i * h // t, (i + 1) * h // t)}
        assert set(local.tolist()) == needed
        assert all(i * s // t <= q // fitted.q_per_kv < (i + 1) * s // t
                   for q in range(i * h // t, (i + 1) * h // t))


def test_fit_params_pads_and_repeats_and_unfit_params_undoes_it():
    base = config(517)
    fitted = fit_to_layout(base, layout("tp=8"))
    rng = np.random.default_rng(0)
    params = {"embed/embedding": rng.normal(size=(517, 64)).astype(np.float32),
              "lm_head": rng.normal(size=(517, 64)).astype(np.float32),
              "layers/0/attn/k_proj": rng.normal(size=(64, 2, 8)).astype(np.float32),
              "layers/0/attn/v_proj": rng.normal(size=(64, 2, 8)).astype(np.float32),
              "layers/0/attn/q_proj": rng.normal(size=(64, 8, 8)).astype(np.float32)}
    out = {n: np.asarray(a) for n, a in fit_params(params, base, fitted).items()}
    assert out["embed/embedding"].shape == (520, 64) and out["lm_head"].shape == (520, 64)
    assert not out["embed/embedding"][517:].any() and not out["lm_head"][517:].any()
    np.testing.assert_array_equal(out["embed/embedding"][:517], params["embed/embedding"])
    assert out["layers/0/attn/k_proj"].shape == (64, 8, 8)
    for j in range(8):
        np.testing.assert_array_equal(out["layers/0/attn/v_proj"][:, j],
                                      params["layers/0/attn/v_proj"][:, j // 4])
    assert out["layers/0/attn/q_proj"] is params["layers/0/attn/q_proj"]
    back = unfit_params(out, base, fitted)
    for name, array in params.items():
        np.testing.assert_array_equal(np.asarray(back[name]), array)


# ---- query heads (and KV heads) that cannot split ----

@pytest.mark.parametrize("heads,kv,mesh,axis,works", [
    (8, 2, "tp=3", "q_heads", "1, 2, 4, 8"),
    (6, 2, "tp=4", "q_heads", "1, 2, 6"),
    (6, 2, "tp=3", "kv_heads", "1, 2, 6"),  # 6 query heads split, 2 KV heads cannot follow
])
def test_heads_that_cannot_split_name_the_rules_and_list_the_degrees_that_work(heads, kv, mesh,
                                                                               axis, works):
    with pytest.raises(ShardingError) as err:
        fit_to_layout(config(heads=heads, kv_heads=kv), layout(mesh))
    msg = str(err.value)
    assert "sharding_rules/tp.yaml" in msg and f"logical axis {axis!r}" in msg
    assert f"{heads} query heads and {kv} KV heads" in msg and f"degrees that work: {works}" in msg
    assert working_degrees(config(heads=heads, kv_heads=kv)) == [int(d) for d in works.split(", ")]


def test_loading_on_a_mesh_the_heads_do_not_fit_fails_before_touching_devices(model):
    _, model_dir = model(517)
    with pytest.raises(ShardingError, match=r"num_heads\), not divisible by mesh axis 'tp' of size "
                                            r"3.*degrees that work: 1, 2, 4, 8"):
        LLM(model_dir, mesh="tp=3", rules="tp")


# ---- end to end against HF ----

@pytest.mark.parametrize("vocab", [517, 32001])
@pytest.mark.parametrize("mesh,rules", MESHES, ids=MESH_IDS)
def test_logits_of_the_real_vocabulary_match_hf(model, vocab, mesh, rules):
    hf_dir, model_dir = model(vocab)
    llm = LLM(model_dir, mesh=mesh, rules=rules, **ENGINE)
    assert llm.config.vocab_size == vocab and llm.config.vocab_rows % 2 == 0
    for prompt, logits in zip(PROMPTS, llm.logits(PROMPTS)):
        assert logits.shape == (len(prompt), vocab)
        assert_close_to_reference(logits, hf_logits(hf_dir, prompt))


@pytest.mark.parametrize("vocab,mesh,rules", [(517, "tp=4", "tp"), (517, "dp=2,tp=2", "dp_tp"),
                                              (32001, "tp=8", "tp")])
def test_generate_never_returns_a_padding_id(model, vocab, mesh, rules):
    hf_dir, model_dir = model(vocab)
    llm = LLM(model_dir, mesh=mesh, rules=rules, **ENGINE)
    assert llm.config.vocab_rows > vocab
    prompt = PROMPTS[0]
    greedy = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
    sampled = [SamplingParams(temperature=1.0, max_tokens=6, logprobs=5, seed=s, ignore_eos=True)
               for s in range(3)]
    outs = llm.generate([prompt] * 4, [greedy] + sampled, use_tqdm=False)
    for out in outs:
        o = out.outputs[0]
        assert len(o.token_ids) == 6 and all(0 <= t < vocab for t in o.token_ids)
        assert all(0 <= t < vocab for top in o.logprobs for t in top)
        # logprobs are normalised over the real vocabulary: equal to HF's log-softmax
        ref = torch.log_softmax(torch.tensor(hf_logits(hf_dir, prompt + o.token_ids)), -1).numpy()
        for i, (token, top) in enumerate(zip(o.token_ids, o.logprobs)):
            row = ref[len(prompt) - 1 + i]
            assert len(top) in (5, 6) and all(abs(lp - row[t]) < 1e-4 for t, lp in top.items())
    assert outs[0].outputs[0].token_ids == \
        [int(np.argmax(r)) for r in hf_logits(hf_dir, prompt + outs[0].outputs[0].token_ids)
         [len(prompt) - 1:-1]]


@pytest.mark.parametrize("mesh", ["tp=4", "tp=8"])
def test_two_kv_heads_on_many_devices_hold_one_each_and_match_hf(model, mesh):
    hf_dir, model_dir = model(517)
    # as declared (the float32 kernel's CPUs store rows [out, in] by default)
    fitted, _, params = restore_model(model_dir, Layout.create(mesh, "tp"), weight_layout="in_out")
    t = int(mesh.split("=")[1])
    assert fitted.num_kv_heads == 2 and fitted.stored_kv_heads == t
    flat = flat_params(params)
    for name in ("layers/0/attn/k_proj", "layers/1/attn/v_proj"):
        array = flat[name]
        assert array.shape == (64, t, 8)
        assert {s.data.shape for s in array.addressable_shards} == {(64, 1, 8)}
    embedding = flat["embed/embedding"]
    assert embedding.shape == (520, 64)
    assert {s.data.shape for s in embedding.addressable_shards} == {(520 // t, 64)}
    llm = LLM(model_dir, mesh=mesh, rules="tp", **ENGINE)
    assert {s.data.shape[2] for s in llm.runner.kv.buffers["k"][0].addressable_shards} == {1}
    for prompt, logits in zip(PROMPTS, llm.logits(PROMPTS)):
        assert_close_to_reference(logits, hf_logits(hf_dir, prompt))


def test_shard_info_counts_the_padding_and_the_kv_copies(model, capsys):
    _, model_dir = model(517)
    assert cli_main(["shard-info", "--model", str(model_dir), "--mesh", "tp=8"]) == 0
    out = capsys.readouterr().out
    lines = {l.split()[0]: l for l in out.splitlines() if l.startswith(("embed/", "layers/0/attn"))}
    # 520 rows x 64 float32 over 8 devices; one KV head of 64x8 float32 per device
    assert "520x64" in lines["embed/embedding"] and lines["embed/embedding"].endswith("16,640")
    assert "64x8x8" in lines["layers/0/attn/k_proj"]
    assert lines["layers/0/attn/k_proj"].endswith(" 2,048")
    assert "padded from 517 to 520" in out and "repeated 4 times" in out
    assert cli_main(["shard-info", "--model", str(model_dir), "--mesh", "tp=3"]) == 2
    assert "degrees that work: 1, 2, 4, 8" in capsys.readouterr().err


def test_saving_a_fitted_model_writes_the_checkpoint_shapes(model, tmp_path):
    from jaxserve.checkpoint import save_model

    hf_dir, model_dir = model(517)
    fitted, _, params = restore_model(model_dir, Layout.create("tp=4", "tp"))
    save_model(tmp_path / "again", fitted, params)
    base, _, again = restore_model(tmp_path / "again", Layout.create(None, "tp"),
                                   weight_layout="in_out")  # as declared, as in the checkpoint
    assert base.vocab_rows == 517 and base.stored_kv_heads == 2
    assert flat_params(again)["layers/0/attn/k_proj"].shape == (64, 2, 8)
    logits = LLM(tmp_path / "again").logits(PROMPTS[:1])[0]
    assert_close_to_reference(logits, hf_logits(hf_dir, PROMPTS[0]))
