"""Output processing on a worker thread gives what inline processing gives: the same tokens,
text, logprobs and finish reasons offline, and the same streams online; a stop string the
worker finds late still drops every token after it.

Oracle: the same engine with output_processing="inline" (detokenization and stop checks on
the engine thread, right after readback, as before).
"""

import ast
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import jaxserve.engine.output_processor as output_processor
from jaxserve import LLM, SamplingParams
from jaxserve.engine.loop import Delta, EngineLoop, Failure, Final
from jaxserve.engine.output_processor import LateStop, OutputProcessor
from jaxserve.engine.sequence import Request, SampledToken, TokenStop
from jaxserve.engine.timeline import Timeline
from jaxserve.package_data import embedded_model

TINY = embedded_model()
# no prefix caching: each mode's run must compute what the other's did, not reuse its KV
ENGINE = dict(max_model_len=128, block_size=8, max_num_batched_tokens=64, max_num_seqs=8,
              enable_prefix_caching=False)
PROMPTS = ["def main():", "import os\n", "class Config:", "for i in range(", "return self.",
           "    if x is None:"]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=24, stop=["\n"]),
    SamplingParams(temperature=0.8, seed=1, max_tokens=24, stop=["):", "self"], logprobs=3),
    SamplingParams(temperature=0, max_tokens=20, min_tokens=5, stop=[" "]),
    SamplingParams(temperature=1.0, top_p=0.9, seed=2, max_tokens=30, n=2, stop=["("],
                   logprobs=1),
    SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[13]),
    SamplingParams(temperature=0.7, seed=5, max_tokens=40, ignore_eos=True, logprobs=2),
]


@pytest.fixture(scope="module")
def llm():
    return LLM(TINY, **ENGINE)


def assert_same_outputs(got, want):
    """Tokens, text and finish reasons exactly; logprobs to float32 rounding (a request whose
    stop is applied a step later changes the batch shape of later steps, and XLA's products
    round by shape)."""
    assert len(got) == len(want)
    for got_request, want_request in zip(got, want):
        for (text, ids, lps, cum, reason, stop), (text_, ids_, lps_, cum_, reason_, stop_) in \
                zip(got_request, want_request, strict=True):
            assert (text, ids, reason, stop) == (text_, ids_, reason_, stop_)
            assert (lps is None) == (lps_ is None)
            for top, top_ in zip(lps or [], lps_ or [], strict=True):
                assert top.keys() == top_.keys()
                assert list(top.values()) == pytest.approx(list(top_.values()), rel=1e-5,
                                                           abs=1e-5)
            assert (cum is None and cum_ is None) or cum == pytest.approx(cum_, rel=1e-5,
                                                                          abs=1e-5)


def offline(llm, mode):
    llm.engine.output.set_mode(mode)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [[(c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason,
              c.stop_reason) for c in out.outputs] for out in outs]


def test_a_worker_thread_gives_the_outputs_of_inline_processing(llm):
    inline = offline(llm, "inline")
    assert any(reason == "stop" and isinstance(stop, str)  # stop strings do finish requests
               for out in inline for _, _, _, _, reason, stop in out)
    discarded = llm.engine.counters["discarded_tokens"]
    assert_same_outputs(offline(llm, "thread"), inline)
    assert llm.engine.counters["discarded_tokens"] >= discarded
    assert not llm.engine.requests and not llm.engine.output.busy
    assert llm.engine.kv_blocks_used == 0


def collect(stream):
    text, tokens, finals = {}, {}, {}
    while len(finals) < stream.open_sequences:
        event = stream.get(timeout=120)
        if isinstance(event, Failure):
            raise event.error
        if isinstance(event, Delta):
            text[event.index] = text.get(event.index, "") + event.text
            tokens.setdefault(event.index, []).extend(event.token_ids)
        if isinstance(event, Final):
            text[event.index] = text.get(event.index, "") + event.text
            finals[event.index] = event
    return text, tokens, finals


def test_streams_from_the_worker_thread_equal_offline_outputs(llm):
    expected = offline(llm, "inline")
    llm.engine.output.set_mode("thread")
    loop = EngineLoop(llm.engine)
    try:
        results = [None] * len(PROMPTS)

        def client(i):
            ids = llm.tokenizer.encode(PROMPTS[i])
            results[i] = collect(loop.submit(f"s{i}", ids, PARAMS[i], PROMPTS[i]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, (text, tokens, finals) in enumerate(results):
            for k, (want_text, want_ids, _, _, reason, _) in enumerate(expected[i]):
                assert text[k] == want_text and tokens[k] == want_ids
                assert finals[k].finish_reason == reason
                assert finals[k].completion_tokens == len(want_ids)
    finally:
        loop.stop()
        llm.engine.output.set_mode("inline")


def test_the_timeline_shows_the_worker_threads_spans(llm):
    llm.engine.timeline.reset()
    offline(llm, "thread")
    trace = llm.engine.timeline.chrome_trace()
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert "output thread" in names
    llm.engine.output.set_mode("inline")


def test_a_stop_string_found_late_drops_every_token_after_it(llm, monkeypatch):
    start = llm.engine.counters["discarded_tokens"]
    inline = offline(llm, "inline")
    before = dict(llm.engine.counters)
    inline_discarded = before["discarded_tokens"] - start
    slow_text = OutputProcessor._text

    def slow(self, arrays, item):  # the worker lags several steps behind the device
        time.sleep(0.02)
        return slow_text(self, arrays, item)

    monkeypatch.setattr(OutputProcessor, "_text", slow)
    assert_same_outputs(offline(llm, "thread"), inline)
    after = llm.engine.counters
    assert after["generated_tokens"] - before["generated_tokens"] == \
        sum(len(ids) for out in inline for _, ids, *_ in out)
    assert after["discarded_tokens"] - before["discarded_tokens"] > inline_discarded
    assert llm.engine.kv_blocks_used == 0
    llm.engine.output.set_mode("inline")


def applied(llm, request, text):
    """`text`'s tokens as the scheduler hands them over: appended, none stopped by its id."""
    seq = request.sequences[0]
    seq.detokenizer = llm.tokenizer.incremental(request.prompt_ids, skip_special_tokens=True)
    ids = llm.tokenizer.encode(text, add_bos=False)
    seq.output_ids = list(ids)
    return ids, [SampledToken(seq, row, token, row + 1, None) for row, token in enumerate(ids)]


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_the_text_part_returns_its_late_stops_and_finished_requests(llm, mode):
    """Given only a timeline, the processor turns applied tokens into text and returns what the
    owner must apply: the stop string's sequence keeps the tokens up to the one that completes
    it, and the request is done."""
    processor = OutputProcessor(Timeline(), mode)
    prompt = llm.tokenizer.encode("def main():")
    request = Request("r", prompt, SamplingParams(temperature=0, max_tokens=40, stop=["):"]),
                      [0], 128)
    ids, sampled = applied(llm, request, "print(x): return y")
    keep = next(k for k in range(1, len(ids) + 1) if "):" in llm.tokenizer.decode(ids[:k]))
    arrays = {"tokens": np.array(ids, np.int32)}
    processed = processor.process(arrays, sampled)
    if mode == "thread":
        assert processed.late_stops == [] and processed.done == []
        processor.wait()
        processed = processor.collect()
    processor.close()
    seq = request.sequences[0]
    assert processed.late_stops == [LateStop(seq, keep)] and processed.done == [request]
    assert (seq.text.strip(), seq.finish_reason, seq.stop_reason) == ("print(x", "stop", "):")
    assert seq.output_ids == ids  # truncating is the owner's job
    assert processor.collect().done == []  # each decision is returned once


def test_a_stop_by_token_id_finishes_the_text_without_a_late_stop(llm):
    processor = OutputProcessor(Timeline())
    request = Request("r", [1, 5], SamplingParams(temperature=0, max_tokens=3), [0], 128)
    ids, sampled = applied(llm, request, " a b c")
    sampled[-1] = SampledToken(request.sequences[0], len(ids) - 1, ids[-1], len(ids),
                               TokenStop("length", text_stop_wins=True))
    processed = processor.process({"tokens": np.array(ids, np.int32)}, sampled)
    assert processed.late_stops == [] and processed.done == [request]
    assert request.sequences[0].finish_reason == "length"
    assert request.sequences[0].text.strip() == llm.tokenizer.decode(ids).strip() == "a b c"


def test_the_output_processor_imports_neither_the_engine_nor_the_scheduler():
    tree = ast.parse(Path(output_processor.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    assert not imported & {"jaxserve.engine.engine", "jaxserve.engine.scheduler"}, imported
