"""The engine on its own thread: concurrent streams equal offline generate; abort frees KV."""

import threading

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.engine.loop import Delta, EngineLoop, Failure, Final, NotAccepting, QueueFull

ENGINE = dict(max_model_len=128, block_size=8, max_num_batched_tokens=64, max_prefill_chunk=32,
              max_num_seqs=8)


@pytest.fixture(scope="module")
def llm(hf_model_dir):
    return LLM(hf_model_dir("llama")[1], **ENGINE)


def collect(stream):
    tokens, finals = {}, {}
    while len(finals) < stream.open_sequences:
        event = stream.get(timeout=120)
        if isinstance(event, Failure):
            raise event.error
        if isinstance(event, Delta):
            tokens.setdefault(event.index, []).extend(event.token_ids)
        if isinstance(event, Final):
            finals[event.index] = event
    return tokens, finals


def test_concurrent_streams_give_the_tokens_of_offline_generate(llm):
    prompts = [[1, 5 + i, 9, 40 + 3 * i, 7] * (i + 1) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    offline = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    loop = EngineLoop(llm.engine)
    try:
        results = [None] * len(prompts)

        def client(i):
            results[i] = collect(loop.submit(f"r{i}", prompts[i], params))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, (tokens, finals) in enumerate(results):
            assert tokens[0] == offline[i]
            assert finals[0].finish_reason == "length" and finals[0].completion_tokens == 12
            assert finals[0].prompt_tokens == len(prompts[i])
    finally:
        loop.stop()


def test_abort_mid_stream_frees_every_kv_block(llm):
    loop = EngineLoop(llm.engine)
    try:
        stream = loop.submit("long", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=100,
                                                                   ignore_eos=True))
        assert isinstance(stream.get(timeout=60), Delta)
        assert loop.abort("long") is True
        events = []
        while not events or not isinstance(events[-1], Final):
            events.append(stream.get(timeout=60))
        assert events[-1].finish_reason == "abort"
        assert llm.engine.kv_blocks_used == 0
        assert loop.abort("long") is False  # unknown now
    finally:
        loop.stop()


def test_validation_errors_reach_the_submitter_and_the_loop_keeps_serving(llm):
    loop = EngineLoop(llm.engine, max_queue=4)
    try:
        with pytest.raises(ValueError, match="max_tokens"):
            loop.submit("bad", [1, 2], SamplingParams(max_tokens=1000))
        tokens, _ = collect(loop.submit("ok", [1, 2], SamplingParams(temperature=0, max_tokens=3)))
        assert len(tokens[0]) == 3
        loop.drain()
        with pytest.raises(NotAccepting):
            loop.submit("late", [1, 2], SamplingParams(max_tokens=3))
    finally:
        loop.stop()


def test_engine_failure_fails_open_streams_and_refuses_new_work(llm, monkeypatch):
    loop = EngineLoop(llm.engine)
    try:
        def broken_step():
            raise RuntimeError("device lost")
        monkeypatch.setattr(llm.engine, "step", broken_step)
        stream = loop.submit("x", [1, 2, 3], SamplingParams(max_tokens=5))
        event = stream.get(timeout=60)
        assert isinstance(event, Failure) and "device lost" in str(event.error)
        with pytest.raises(NotAccepting):
            loop.submit("y", [1, 2, 3], SamplingParams(max_tokens=5))
    finally:
        loop.stop()
        monkeypatch.undo()
        for request_id in list(llm.engine.requests):
            llm.engine.abort(request_id)


def test_queue_full_is_refused_at_once(llm):
    loop = EngineLoop(llm.engine, max_queue=0)
    try:
        with pytest.raises(QueueFull):
            loop.submit("x", [1, 2], SamplingParams(max_tokens=2))
    finally:
        loop.stop()
