"""When step programs compile: the persistent compilation cache, the background warm-up, and
steps that run in a compiled shape larger than their bucket instead of waiting for a compile."""

import os

import jax
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.cli import build_parser
from jaxserve.engine.step_builder import StepBuilder
from jaxserve.engine.warmup import ShapeCompiler, resolve_mode
from jaxserve.runtime import compile_cache
from jaxserve.settings import SchedulerSettings

# Small limits: a handful of shapes, so a full warm-up stays short.
ENGINE = dict(max_model_len=256, block_size=8, max_num_seqs=8, max_num_batched_tokens=64,
              max_prefill_chunk=64)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(hf_model_dir):
    return hf_model_dir("llama")[1]


@pytest.fixture
def restore_cache():
    """Each test points the process-wide cache where it likes; the suite's comes back after."""
    yield
    compile_cache.use(None)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=n).tolist() for n in lengths]


def token_ids(outputs):
    return [[c.token_ids for c in out.outputs] for out in outputs]


# ---- where compiled programs are kept ----

def test_the_cache_directory_follows_the_setting_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "jaxserve" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "jaxserve" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve(None) == tmp_path / "env"
    assert compile_cache.resolve(tmp_path / "given") == tmp_path / "given"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.resolve(None) is None
    assert compile_cache.resolve("off") is None


def test_a_bad_cache_setting_is_refused_with_its_value(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        compile_cache.resolve(not_a_dir)
    with pytest.raises(TypeError, match="compilation_cache must be a directory or 'off', got 3"):
        compile_cache.resolve(3)


def test_compiled_programs_are_written_to_the_cache_and_a_second_start_compiles_nothing(
        model_dir, tmp_path, restore_cache):
    cache = tmp_path / "xla"
    batch = prompts([5, 40])
    before = compile_cache.xla_compiles()
    first = LLM(model_dir, compilation="on_use", compilation_cache=cache, **ENGINE)
    expected = token_ids(first.generate(batch, GREEDY, use_tqdm=False))
    assert compile_cache.xla_compiles() > before
    assert len(list(cache.iterdir())) >= first.stats()["compilations"] > 0

    compiles, loads = compile_cache.xla_compiles(), compile_cache.cache_loads()
    second = LLM(model_dir, compilation="on_use", compilation_cache=cache, **ENGINE)
    assert token_ids(second.generate(batch, GREEDY, use_tqdm=False)) == expected
    assert compile_cache.xla_compiles() == compiles  # every program came from the cache
    assert compile_cache.cache_loads() - loads >= second.stats()["compilations"]


def test_the_cache_can_be_turned_off(model_dir, tmp_path, monkeypatch, restore_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(compile_cache.ENV, "off")
    llm = LLM(model_dir, compilation="on_use", **ENGINE)
    assert llm.compilation_cache is None and jax.config.jax_compilation_cache_dir is None
    compiles = compile_cache.xla_compiles()
    llm.generate(prompts([9]), GREEDY, use_tqdm=False)
    assert compile_cache.xla_compiles() > compiles  # compiled, and kept nowhere
    assert not (tmp_path / "xdg").exists()


# ---- when programs compile ----

def test_a_bad_compilation_mode_is_refused_with_its_value(model_dir, monkeypatch):
    with pytest.raises(ValueError, match="compilation must be one of .* got 'soon'"):
        LLM(model_dir, compilation="soon")
    monkeypatch.setenv("JAXSERVE_COMPILATION", "later")
    with pytest.raises(ValueError, match=r"\$JAXSERVE_COMPILATION must be one of .* 'later'"):
        resolve_mode(None)
    monkeypatch.delenv("JAXSERVE_COMPILATION")
    assert resolve_mode(None) == "background"


def test_the_cli_passes_the_compilation_settings_to_the_engine():
    for command in (["generate", "--prompt", "x"], ["serve"]):
        args = build_parser().parse_args(command + ["--compilation", "upfront",
                                                    "--compilation-cache", "off"])
        assert (args.compilation, args.compilation_cache) == ("upfront", "off")


def builder(**limits) -> StepBuilder:
    limits = SchedulerSettings(**{"max_num_seqs": 32, "max_num_batched_tokens": 512,
                                  "max_prefill_rows": 8, "max_model_len": 512, **limits})
    return StepBuilder(limits, 1, block_size=16, trash_slot=32, vocab_rows=64, eos_ids=(2,))


def test_a_step_fits_its_bucket_first_then_larger_shapes_cheapest_first():
    b = builder()
    for decodes, prefill in [(1, 0), (3, 0), (1, 16), (0, 100), (20, 300), (32, 512)]:
        fits = b.covering(decodes, prefill)
        assert fits[0] == b.shape_for(decodes, prefill)
        assert all(d >= decodes and p >= prefill for d, p in fits)
        assert [d + p for d, p in fits] == sorted(d + p for d, p in fits)
        assert set(fits) == {s for s in b.shapes() if s[0] >= decodes and s[1] >= prefill}
    assert (8, 32) in b.covering(3, 0)  # a decode-only step fits a shape with prefill too


class _Runner:
    """Compiled shapes only (what ShapeCompiler asks of a runner)."""

    def __init__(self, shapes):
        self.shapes = set(shapes)

    def has_step(self, inputs):
        d = inputs.metadata.decode_rows
        return (d, inputs.tokens.shape[0] - d) in self.shapes


def test_a_step_after_a_prefix_cache_hit_runs_in_a_shape_the_warm_up_compiled_first():
    b = builder()
    compiler = ShapeCompiler(_Runner([]), b, "background", first_prefill_tokens=256,
                             side_programs=(8, 8))
    assert compiler.first == [(8, 256)]  # one compile before the first request
    compiler.runner = _Runner(compiler.first + [(1, 0)])
    # a 128-token prompt again: 112 tokens cached, 16 computed (bucket (0, 32), not compiled)
    assert compiler.shape_for(0, 16) == (8, 256)
    assert compiler.shape_for(1, 0) == (1, 0)
    assert compiler.shape_for(5, 0) == (8, 256)  # no decode bucket of 8 yet
    assert compiler.counters["steps_in_larger_shape"] == 2
    assert compiler.shape_for(32, 0) == (32, 0)  # nothing holds it: it waits for its compile
    assert compiler.counters["steps_waiting_for_compile"] == 1
    order = compiler.background_order()
    assert order[:2] == [(1, 0), (32, 512)]  # a lone decode, then the shape every step fits
    assert sorted(order + compiler.first) == sorted(b.shapes())


def test_a_speculative_engines_plain_steps_run_once_their_plain_program_is_compiled():
    """A speculative engine's decode-only steps without proposals run the plain programs: in
    the background mode only once the thread compiled them (until then the speculative family
    runs them), on use at once; upfront and the thread compile them too."""
    plain = builder(max_num_seqs=8)
    spec = StepBuilder(SchedulerSettings(max_num_seqs=8, max_num_batched_tokens=512,
                                         max_prefill_rows=8, max_model_len=512), 1,
                       block_size=16, trash_slot=32, vocab_rows=64, eos_ids=(2,),
                       speculative_tokens=4)
    assert spec.decode_buckets == [1, 5, 20, 40] and plain.decode_buckets == [1, 4, 8]

    class Runner:  # compiled programs by (decode rows, tokens, verifies)
        def __init__(self):
            self.compiled = set()

        @staticmethod
        def key(inputs):
            return (inputs.metadata.decode_rows, inputs.tokens.shape[0],
                    inputs.verify is not None)

        def has_step(self, inputs):
            return self.key(inputs) in self.compiled

        def compile_steps(self, many, threads):
            before = len(self.compiled)
            self.compiled |= {self.key(i) for i in many}
            return len(self.compiled) - before

        def compile_side_programs(self, *sizes):
            return 0

    runner = Runner()
    compiler = ShapeCompiler(runner, spec, "background", 64, (8, 8), plain=plain)
    assert compiler.plain_shape(3) is None  # not compiled yet
    runner.compiled.add((4, 4, False))
    assert compiler.plain_shape(3) == (4, 0)
    assert compiler.plain_shape(1) is None
    assert ShapeCompiler(Runner(), spec, "on_use", 64, (8, 8), plain=plain).plain_shape(5) \
        == (8, 0)
    assert ShapeCompiler(Runner(), spec, "on_use", 64, (8, 8)).plain_shape(5) is None
    upfront = Runner()
    ShapeCompiler(upfront, spec, "on_use", 64, (8, 8), plain=plain).compile_all(1)
    assert {(d, d, False) for d in plain.decode_buckets} <= upfront.compiled
    assert {(d, d, True) for d in spec.decode_buckets} <= upfront.compiled


def test_background_warm_up_runs_steps_in_compiled_shapes_and_steady_state_compiles_nothing(
        model_dir):
    llm = LLM(model_dir, compilation="background", **ENGINE)
    compiler = llm.engine.compiler
    compiler.stop()  # freeze the warm-up: from here only the first shape (and one more) exist
    assert compiler.first == [(8, 64)]  # with these limits the first shape holds every step
    batch = prompts([5, 17, 40, 64, 90, 120])
    early = token_ids(llm.generate(batch, GREEDY, use_tqdm=False))
    stats = llm.stats()
    assert stats["steps_waiting_for_compile"] == 0
    assert stats["steps_in_larger_shape"] > 0

    llm.warmup()  # steady state: every shape compiled
    assert llm.stats()["step_shapes_compiled"] == llm.stats()["step_shapes"]
    compilations, xla, larger = (llm.stats()["compilations"], compile_cache.xla_compiles(),
                                 llm.stats()["steps_in_larger_shape"])
    llm.engine.clear_prefix_cache()
    assert token_ids(llm.generate(batch, GREEDY, use_tqdm=False)) == early  # in their buckets
    again = token_ids(llm.generate(batch, GREEDY, use_tqdm=False))  # prefix cache hits
    assert again == early and llm.stats()["prefix_cache_hits"] > 0
    mixed = [SamplingParams(temperature=0.8, seed=1, max_tokens=9, n=2),
             SamplingParams(temperature=0, max_tokens=7, repetition_penalty=1.3, logprobs=2),
             GREEDY]
    for wave in range(2):
        llm.generate(prompts([3, 33, 70], seed=wave), mixed, use_tqdm=False)
    stats = llm.stats()
    assert stats["compilations"] == compilations
    assert compile_cache.xla_compiles() == xla
    assert stats["steps_waiting_for_compile"] == 0
    assert stats["steps_in_larger_shape"] == larger
