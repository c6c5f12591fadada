"""Disaggregated prefill/decode: a prefill engine and a decode engine on disjoint simulated CPU
devices, and the KV handoff between them (jaxserve/engine/handoff.py).

Oracles: the colocated engine's tokens (same precision: identical, greedy and seeded with
penalties; bf16 prefill -> int8 KV decode: agreement and log-probs within stated bounds of
float32), and after every injected fault the block and handoff counters of both sides back to
0 with the other requests' tokens unchanged. One pair of engines serves most tests (prefill on
device 0, decode tp=2 on devices 2-3), with a decode pool small enough that requests wait for
it; the head layout conversion (a decode mesh that stores every KV head twice) is checked on
its own, against the layout restore gives the weights.
"""

import dataclasses

import grpc
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.engine.handoff import HandoffState, check_pair, reblock, relayout_heads
from jaxserve.kv_cache import kv_formats
from jaxserve.placement import fit_params
from jaxserve.serving.client import Client
from jaxserve.serving.server import SERVICE, Server
from jaxserve.settings import DisaggregationSettings, Settings
from tests.serving_helpers import scrape, wait_until

ENGINE = dict(max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
              max_prefill_chunk=32)
PAIR = {"prefill": {"devices": [0], "kv_blocks": 16},
        # 5 usable blocks: two of the requests below at a time, the others wait (back-pressure)
        "decode": {"mesh": "tp=2", "devices": [2, 3], "kv_blocks": 6}}
PROMPTS = [[1, 5 + i, 9, 40 + 3 * i, 7] * (1 + i % 2) for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True,
                        repetition_penalty=1.3)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def model_dir(hf_model_dir):
    return hf_model_dir("llama")[1]


@pytest.fixture(scope="module")
def colocated(model_dir):
    llm = LLM(model_dir, kv_blocks=16, **ENGINE)  # the prefill engine's programs, compiled once
    return llm, {name: tokens(llm.generate(PROMPTS, params, use_tqdm=False))
                 for name, params in (("greedy", GREEDY), ("seeded", SEEDED))}


@pytest.fixture(scope="module")
def pair(model_dir):
    return LLM(model_dir, disaggregate=PAIR, **ENGINE)


def assert_all_free(llm):
    engine = llm.engine
    for role in (engine.prefill, engine.decode):
        assert role.kv_blocks_used == 0 and not role.requests
        assert not role.scheduler.running and not role.scheduler.handing_off
        for pool in role.pools:
            pool.check()
    assert len(engine.handoffs) == 0


# ---- same precision: the colocated engine's tokens ----

def test_same_precision_gives_the_colocated_tokens_greedy_and_seeded(pair, colocated):
    _, want = colocated
    assert tokens(pair.generate(PROMPTS, GREEDY, use_tqdm=False)) == want["greedy"]
    assert tokens(pair.generate(PROMPTS, SEEDED, use_tqdm=False)) == want["seeded"]
    stats = pair.stats()
    assert stats["handoffs"] == 2 * len(PROMPTS) and stats["handoff_failures"] == 0
    # receiver full: the decode pool holds two requests, so handoffs waited and then finished
    assert stats["handoff_refusals"] > 0
    assert stats["handoff_format"] == "float32->float32"
    # 2 layers x (k, v) x [blocks, 8 tokens, 2 heads, 16] float32, as the prefill pool holds them
    assert stats["handoff_bytes"] > 0 and stats["handoff_bytes"] % (2 * 2 * 8 * 2 * 16 * 4) == 0
    assert 0 < stats["prefill_utilization"] < 1 and 0 < stats["decode_utilization"] < 1
    assert stats["prefill"]["kv_cache_dtype"] == "float32"
    assert_all_free(pair)


# ---- faults ----

class Faults:
    """A fault hook: at `state`, call `action(handoff)` for the first `times` handoffs."""

    def __init__(self, state, action, times=1):
        self.state, self.action, self.times, self.seen = state, action, times, 0

    def __call__(self, handoff, state):
        if state is self.state and self.seen < self.times:
            self.seen += 1
            self.action(handoff)


@pytest.fixture
def faults(pair):
    def install(hook):
        pair.engine.handoffs.fault = hook
    yield install
    pair.engine.handoffs.fault = None


def boom(handoff):
    raise OSError("link down")


def test_a_transfer_error_is_retried_and_the_tokens_are_unchanged(pair, colocated, faults):
    faults(Faults(HandoffState.TRANSFERRED, boom))
    before = pair.stats()["handoff_failures"]
    assert tokens(pair.generate(PROMPTS, GREEDY, use_tqdm=False)) == colocated[1]["greedy"]
    assert pair.stats()["handoff_failures"] == before + 1
    assert_all_free(pair)


def test_a_handoff_that_keeps_failing_ends_its_request_with_a_clear_error(pair, colocated,
                                                                         faults):
    faults(Faults(HandoffState.CONVERTED, boom, times=pair.engine.handoffs.retries + 1))
    outputs = pair.generate(PROMPTS, GREEDY, use_tqdm=False)
    failed = outputs[0].outputs[0]
    assert failed.finish_reason == "error" and "KV handoff failed: link down" in \
        failed.stop_reason
    assert tokens(outputs)[1:] == colocated[1]["greedy"][1:]  # the others are unaffected
    assert_all_free(pair)


@pytest.mark.parametrize("state", [s for s in HandoffState if s is not HandoffState.READY])
def test_an_abort_at_each_handoff_state_frees_both_sides(pair, colocated, faults, state):
    faults(Faults(state, lambda handoff: pair.engine.abort(handoff.request_id)))
    outputs = run(pair.engine, f"abort-{state.value}")
    assert outputs[0].outputs[0].finish_reason == "abort"
    assert tokens(outputs)[1:] == colocated[1]["greedy"][1:]
    assert_all_free(pair)


def run(engine, name):
    """PROMPTS through the engine's own loop (an abort ends a request without returning it)."""
    requests = [engine.add_request(f"{name}-{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    while engine.has_unfinished():
        engine.step()
    return [r.output() for r in requests]


def test_aborts_during_prefill_while_waiting_and_during_decode_free_both_sides(pair):
    engine = pair.engine
    requests = [engine.add_request(f"abort-{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    engine.abort("abort-0")  # waiting for prefill
    while not engine.handoffs.pending or not engine.decode.requests:
        engine.step()
    engine.abort(next(iter(engine.decode.requests)))  # decoding
    engine.abort(engine.handoffs.pending[0].request_id)  # prefilled, waiting for decode
    while engine.has_unfinished():
        engine.step()
    reasons = sorted(r.sequences[0].finish_reason for r in requests)
    assert reasons == ["abort", "abort", "abort", "length"]
    assert_all_free(pair)


def test_the_decode_engine_raising_mid_step_frees_both_sides(pair, colocated, monkeypatch):
    runner = pair.engine.decode.runner
    step = runner.step
    calls = []

    def fails_once(inputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("decode device lost")
        return step(inputs)

    monkeypatch.setattr(runner, "step", fails_once)
    with pytest.raises(RuntimeError, match="decode device lost"):
        pair.generate(PROMPTS, GREEDY, use_tqdm=False)
    pair.engine.drain()
    assert_all_free(pair)
    assert tokens(pair.generate(PROMPTS, GREEDY, use_tqdm=False)) == colocated[1]["greedy"]


def test_the_handoff_lays_kv_heads_out_as_each_mesh_stores_them():
    """2 KV heads stored once (tp=1) -> twice (tp=4, scales too): stored head j is head j // 2,
    the layout `placement.fit_params` gives the k/v projections; and back."""
    base = ModelConfig(family="llama", vocab_size=16, hidden_size=32, intermediate_size=8,
                       num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                       max_position_embeddings=64)
    proj = np.arange(32 * 2 * 16, dtype=np.float32).reshape(32, 2, 16)
    fitted = fit_params({"layers/0/attn/k_proj": proj}, base,
                        dataclasses.replace(base, kv_head_copies=2))["layers/0/attn/k_proj"]
    # [layers, blocks, block_size, kv_heads, head_dim] and its scale without head_dim
    k = np.arange(2 * 1 * 8 * 2 * 16, dtype=np.float32).reshape(2, 1, 8, 2, 16)
    blocks = {"k": k, "k_scale": k[..., 0]}
    there = {name: np.asarray(a) for name, a in
             relayout_heads(blocks, {"k": 3, "k_scale": 3}, 1, 2).items()}
    assert np.array_equal(there["k"], k[:, :, :, [0, 0, 1, 1]])
    assert np.array_equal(np.asarray(fitted), proj[:, [0, 0, 1, 1]])  # the weights' layout
    assert np.array_equal(there["k_scale"], k[..., [0, 0, 1, 1], 0])
    back = relayout_heads(there, {"k": 3, "k_scale": 3}, 2, 1)
    assert all(np.array_equal(np.asarray(back[n]), blocks[n]) for n in blocks)


# ---- block sizes ----

def test_prefill_in_blocks_of_4_and_decode_in_blocks_of_8_give_the_colocated_tokens(
        model_dir, colocated):
    """The roles differ only in block size: the handoff lays each sequence's tokens into the
    receiver's blocks (prompts of 5 and 10 tokens: 2 or 3 blocks of 4 -> 1 or 2 of 8)."""
    pair = {"prefill": {"devices": [1], "block_size": 4, "kv_blocks": 32},
            "decode": {"devices": [2], "kv_blocks": 16}}
    llm = LLM(model_dir, disaggregate=pair, **ENGINE)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == colocated[1]["greedy"]
    assert llm.engine.prefill.runner.block_size == 4 and llm.runner.block_size == 8
    assert llm.stats()["handoffs"] == len(PROMPTS)
    llm.engine.drain()
    assert_all_free(llm)


def test_reblock_lays_the_tokens_end_to_end_in_the_receivers_blocks():
    # [layers, blocks, block_size, kv_heads]: token t of layer l holds 100 * l + t
    tokens_ = (100 * np.arange(2)[:, None] + np.arange(12)).astype(np.float32)
    blocks = {"k": np.repeat(tokens_.reshape(2, 3, 4)[..., None], 2, axis=-1)}
    to8 = np.asarray(reblock(blocks, 4, 8, 10)["k"])
    assert to8.shape == (2, 2, 8, 2)
    assert np.array_equal(to8.reshape(2, 16, 2)[:, :10], tokens_[:, :10, None].repeat(2, -1))
    assert not to8.reshape(2, 16, 2)[:, 10:].any()  # the last block's slots past them: zero
    to3 = np.asarray(reblock({"k": to8}, 8, 3, 10)["k"])  # and into blocks of another size
    assert to3.shape == (2, 4, 3, 2)
    assert np.array_equal(to3.reshape(2, 12, 2)[:, :10], tokens_[:, :10, None].repeat(2, -1))
    assert reblock(blocks, 4, 4, 12)["k"] is blocks["k"]  # already the receiver's blocks
    with pytest.raises(ValueError, match=r"'k': 3 blocks of 4 tokens cannot hold 13 tokens"):
        reblock(blocks, 4, 8, 13)
    with pytest.raises(ValueError, match="comes in blocks of 4 tokens, not the prefill block "
                       "size 8"):
        reblock(blocks, 8, 4, 10)
    with pytest.raises(ValueError, match="decode block size must be a positive integer, got 0"):
        reblock(blocks, 4, 0, 10)


# ---- bf16 prefill -> int8 KV decode ----

# Measured over these 4 prompts x 6 tokens: agreement 1.0, worst log-prob gap 0.0027; the
# bounds allow one prompt to depart at its last tokens (a near tie of a random model) and
# bf16's ~3 significant digits over 2 layers. A wrong scale or head layout departs at once.
AGREEMENT = 0.75
LOGPROB_TOLERANCE = 0.05


def test_bf16_prefill_to_int8_decode_agrees_with_float32_within_stated_bounds(model_dir,
                                                                             colocated):
    mixed = {"prefill": {"devices": [1], "dtype": "bfloat16", "kv_blocks": 16},
             "decode": {"devices": [2], "kv_cache_dtype": "int8", "kv_blocks": 16},
             "transfer": "host"}
    llm = LLM(model_dir, disaggregate=mixed, **ENGINE)
    with_logprobs = dataclasses.replace(GREEDY, logprobs=1)
    got = llm.generate(PROMPTS, with_logprobs, use_tqdm=False)
    want = colocated[0].generate(PROMPTS, with_logprobs, use_tqdm=False)
    same, gaps = 0, []
    for g, w in zip(got, want):
        g, w = g.outputs[0], w.outputs[0]
        agree = next((i for i, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b),
                     len(w.token_ids))
        same += agree
        gaps += [abs(g.logprobs[i][t] - w.logprobs[i][t])
                 for i, t in enumerate(w.token_ids[:agree])]
    rate = same / sum(len(w.outputs[0].token_ids) for w in want)
    print(f"bf16 -> int8 KV: agreement {rate:.3f}, worst log-prob gap {max(gaps):.4f}")
    assert rate >= AGREEMENT and max(gaps) <= LOGPROB_TOLERANCE
    stats = llm.stats()
    assert stats["handoff_format"] == "bfloat16->int8" and stats["handoff_transfer"] == "host"
    assert stats["decode"]["kv_cache_dtype"] == "int8"


# ---- KV residency: preempted sequences wait in host memory ----

def test_preemption_swaps_kv_to_host_and_back_with_the_same_tokens(model_dir, colocated):
    tight = LLM(model_dir, swap_preempted=True, **{**ENGINE, "kv_blocks": 4})  # 3 usable
    outputs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tokens(outputs) == colocated[1]["greedy"]
    stats = tight.stats()
    assert stats["preemptions"] > 0 and stats["swapped_out"] == stats["preemptions"]
    assert stats["swapped_in"] == stats["swapped_out"] and stats["swap_bytes"] > 0
    # a swapped-in sequence computes its last token only, never its prompt again
    assert stats["prefill_tokens"] == sum(map(len, PROMPTS)) + stats["swapped_in"]
    assert stats["kv_blocks_used"] == 0


# ---- bad input ----

@pytest.mark.parametrize("config, says", [
    ({"prefill": {"devices": [0, 1], "mesh": "tp=2"}, "decode": {"devices": [1, 2],
                                                               "mesh": "tp=2"}},
     r"prefill devices \[0, 1\] and decode devices \[1, 2\] overlap at \[1\]"),
    ({"prefill": {"devices": [0]}}, r"'decode' must be a dict with mesh and devices, got None"),
    ({"prefill": {"devices": [0], "mesh": "tp=2"}, "decode": {"devices": [1]}},
     r"prefill: mesh 'tp=2' has 2 device\(s\) but its devices \[0\] are 1"),
    ({"prefill": {"devices": []}, "decode": {"devices": [1]}},
     r"prefill: devices must be a non-empty list of device ids .*, got \[\]"),
    ({"prefill": {"devices": [0], "mesh_": "tp=1"}, "decode": {"devices": [1]}},
     r"prefill: unknown key 'mesh_'"),
    ({"prefill": {"devices": [0]}, "decode": {"devices": [1]}, "transfer": "rdma"},
     r"transfer must be one of auto, device, host, got 'rdma'"),
    ({"prefill": {"devices": [0]}, "decode": {"devices": [1], "block_size": 0}},
     r"decode: block_size must be a positive integer, got 0"),
])
def test_bad_pairs_are_refused_naming_the_value(config, says):
    with pytest.raises(ValueError, match=says):
        DisaggregationSettings.from_config(config)


def test_missing_devices_and_unconvertible_formats_are_refused_before_loading(tmp_path,
                                                                              model_dir):
    with pytest.raises(ValueError, match=r"device ids \[8, 9\] do not exist: there are 8 cpu"):
        LLM(model_dir, disaggregate={"prefill": {"devices": [0]},
                                     "decode": {"devices": [8, 9], "mesh": "tp=2"}})
    with pytest.raises(ValueError, match="cannot convert kv_cache_dtype 'int8' .prefill. to "
                                         "'fp8_e4m3' .decode."):
        LLM(model_dir, disaggregate={"prefill": {"devices": [0], "kv_cache_dtype": "int8"},
                                     "decode": {"devices": [1], "kv_cache_dtype": "fp8_e4m3"}})
    formats = kv_formats()
    assert check_pair(formats["float32"], formats["int8"]) is not None
    bad = tmp_path / "pair.yaml"
    bad.write_text("prefill: {devices: [0]}\ndecode: {devices: [0]}\n")
    with pytest.raises(ValueError, match=f"disaggregate file '{bad}': .*overlap at \\[0\\]"):
        DisaggregationSettings.load(bad)
    with pytest.raises(TypeError, match="settings.disaggregation must be a "
                                        "DisaggregationSettings or None, got dict"):
        Settings(disaggregation={"prefill": 1})


def test_the_disaggregate_flag_reads_its_yaml_for_generate_and_serve(tmp_path, capsys):
    from jaxserve import cli

    good = tmp_path / "pair.yaml"
    good.write_text("prefill: {devices: [0], dtype: bfloat16}\n"
                    "decode: {mesh: 'tp=2', devices: [2, 3], kv_cache_dtype: int8}\n"
                    "max_prefill_ahead: 2\n")
    for command in ("generate", "serve"):
        args = cli.build_parser().parse_args([command, "--disaggregate", str(good)])
        pair = cli._settings(args).disaggregation
        assert pair.decode.devices == (2, 3) and pair.prefill.dtype == "bfloat16"
        assert pair.max_prefill_ahead == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill: {devices: [0]}\ndecode: {devices: [0, 1], mesh: 'tp=3'}\n")
    assert cli.main(["generate", "--prompt", "x", "--disaggregate", str(bad)]) == 2
    assert "decode: mesh 'tp=3' has 3 device(s) but its devices [0, 1] are 2" in \
        capsys.readouterr().err


def test_n_above_one_and_scoring_are_refused_by_a_pair(pair):
    with pytest.raises(ValueError, match="n=2: disaggregated prefill/decode runs one sequence"):
        pair.generate([PROMPTS[0]], SamplingParams(n=2, max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="score needs one engine"):
        pair.score([PROMPTS[0]], top_n=1)
    assert_all_free(pair)


# ---- the front ends: one gRPC server over the pair (last: the server keeps the engine) ----

def test_grpc_streams_aborts_and_reports_health_and_metrics_over_a_pair(pair, colocated):
    server = Server("127.0.0.1", 0, metrics_port=0).start()
    try:
        server.attach(pair)
        with Client(f"127.0.0.1:{server.port}") as client:
            assert client.health() == "SERVING"
            completion = client.complete(PROMPTS[1], temperature=0, max_tokens=6,
                                         ignore_eos=True)[0]
            assert completion.token_ids == colocated[1]["greedy"][1]
            server.step_delay = 0.05
            stream = client.generate(PROMPTS[0], temperature=0, max_tokens=30, ignore_eos=True,
                                     request_id="long")
            assert next(stream).HasField("delta")
            client.abort("long")
            assert list(stream)[-1].final.finish_reason == "abort"
            server.step_delay = 0.0
            wait_until(lambda: pair.engine.kv_blocks_used == 0, 10, "every KV block free")
            metrics = scrape(server.metrics_port)
            assert metrics['jaxserve_handoffs_total'] >= 2
            assert metrics['jaxserve_queue_length{role="decode"}'] == 0
            assert 'jaxserve_role_utilization{role="prefill"}' in metrics

            def broken(inputs):
                raise RuntimeError("decode engine failed")

            pair.engine.decode.runner.step = broken
            with pytest.raises(grpc.RpcError) as info:
                list(client.generate(PROMPTS[2], max_tokens=4, timeout=30))
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert client.health() == "NOT_SERVING" and client.health(SERVICE) == "NOT_SERVING"
    finally:
        server.stop()
