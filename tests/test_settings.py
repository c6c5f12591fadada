"""The settings tree (jaxserve/settings.py): every setting is a CLI flag, a bad value is the
same clear error from the CLI and from `LLM`, and flat overrides reach the engine."""

import dataclasses
import subprocess
import sys

import pytest

from jaxserve import cli
from jaxserve.settings import (CacheSettings, SchedulerSettings, Settings, SamplingSettings)

ENGINE_COMMANDS = {"generate": ["--prompt", "x"], "serve": [],
                   "score": ["--input", "in.jsonl", "--output", "out.jsonl"]}
LEAVES = list(Settings.leaves())


def sample(leaf) -> tuple[list[str], object]:
    """CLI arguments that set `leaf` to a valid value other than its default, and that value."""
    meta = leaf.field.metadata
    if meta["type"] is bool:
        return [leaf.flag], not leaf.default
    if meta["choices"]:
        value = next(c for c in meta["choices"] if c != leaf.default)
        return [leaf.flag, value], value
    value = {"mesh": "dp=2,tp=2", "rules": "dp_tp", "compilation_cache": "off",
             "latent_calibration": "calibration.txt"}.get(leaf.name)
    if value is None:
        value = 0.5 if meta["type"] is float else 2 * (leaf.default or 16)
    return [leaf.flag, str(value)], value


def test_leaves_have_unique_names_and_flags_and_help():
    assert len({leaf.name for leaf in LEAVES}) == len(LEAVES)
    assert len({leaf.flag for leaf in LEAVES}) == len(LEAVES)
    assert all(leaf.field.metadata["help"] for leaf in LEAVES)
    # today's keyword arguments of LLM, and the sections the tree leaves room for
    assert {leaf.name for leaf in LEAVES} == {
        "block_size", "kv_blocks", "kv_memory_fraction", "enable_prefix_caching", "swap_preempted",
        "max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk",
        "max_prefill_rows", "max_steps_in_flight", "routing", "mesh", "rules", "moe_strategy",
        "moe_auto_threshold", "attention", "latent_transform", "latent_calibration", "sampling", "output_processing",
        "compilation", "compilation_cache", "quantization", "quantize_embeddings", "weight_layout",
        "kv_cache_dtype", "dtype",
        "coordinator", "num_processes", "process_id", "peer_timeout", "connect_timeout"}
    room = Settings()
    assert (room.speculative, room.disaggregation) == (None,) * 2


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
# (the distributed flags only make sense together: tests/test_multihost.py sets them)
@pytest.mark.parametrize("leaf", [leaf for leaf in LEAVES if leaf.section != "distributed"],
                         ids=lambda leaf: leaf.name)
def test_every_setting_has_a_flag_that_reaches_the_tree(command, leaf):
    parser = cli.build_parser()
    defaults = cli._settings(parser.parse_args([command, *ENGINE_COMMANDS[command]]))
    assert defaults == Settings()  # no flag given: the tree's own defaults
    argv, value = sample(leaf)
    settings = cli._settings(parser.parse_args([command, *ENGINE_COMMANDS[command], *argv]))
    assert settings.get(leaf.name) == value != leaf.default
    assert settings == Settings().replace(**{leaf.name: value})  # nothing else moved


def test_shard_info_takes_the_mesh_flags_of_the_tree():
    args = cli.build_parser().parse_args(["shard-info", "--model", "m", "--mesh", "tp=2",
                                          "--rules", "dp_tp", "--dtype", "bfloat16"])
    settings = cli._settings(args)
    assert (settings.parallel.mesh, settings.parallel.rules, settings.dtype) == \
        ("tp=2", "dp_tp", "bfloat16")


BAD = [  # setting, as typed on the command line, as given to LLM, a word the error must hold
    ("max_num_seqs", "0", 0, "max_num_seqs must be a positive integer, got 0"),
    ("block_size", "0", 0, "block_size must be a positive integer, got 0"),
    ("max_prefill_rows", "-1", -1, "max_prefill_rows must be a positive integer, got -1"),
    ("max_num_batched_tokens", "8", 8, "max_num_batched_tokens must be at least 16"),
    ("kv_blocks", "1", 1, "kv_blocks must be an integer >= 2, got 1"),
    ("kv_memory_fraction", "1.5", 1.5, "kv_memory_fraction must be in (0, 1), got 1.5"),
    ("moe_auto_threshold", "-1", -1, "moe_auto_threshold must be a non-negative integer"),
    ("sampling", "fast", "fast", "sampling must be one of sequence_parallel, replicated, "
     "got 'fast'"),
    ("output_processing", "later", "later", "output_processing must be one of auto, inline, thread"),
    ("moe_strategy", "sparse", "sparse", "moe_strategy must be one of dense, alltoall"),
    ("routing", "nearest", "nearest", "routing must be one of ['prefix', 'least_loaded', "
     "'round_robin'] or a policy object, got 'nearest'"),
    ("mesh", "tp=3x", "tp=3x", "mesh 'tp=3x'"),
    ("dtype", "float64", "float64", "dtype must be one of float32, bfloat16, float16, got "
     "'float64'"),
    ("compilation", "soon", "soon", "compilation must be one of background, upfront, on_use, "
     "got 'soon'"),
    ("compilation_cache", "", "", "compilation_cache is empty: give a directory or 'off'"),
    ("quantization", "int4", "int4", "quantization must be one of auto, none, int8, int8-g32, "
     "int8-g64, int8-g128, got 'int4'"),
]


@pytest.mark.parametrize("name,typed,given,says", BAD, ids=[b[0] for b in BAD])
def test_a_bad_setting_is_the_same_clear_error_from_the_cli_and_from_llm(
        name, typed, given, says, capsys, tmp_path):
    from jaxserve import LLM

    flag = next(leaf.flag for leaf in LEAVES if leaf.name == name)
    assert cli.main(["generate", "--prompt", "x", flag, typed]) == 2
    cli_error = capsys.readouterr().err
    # checked before any model is read: the directory does not exist
    with pytest.raises((ValueError, TypeError)) as raised:
        LLM(tmp_path / "no-such-model", **{name: given})
    assert cli_error == f"jaxserve generate: error: {raised.value}\n"
    assert says in str(raised.value)


def test_two_kv_pool_sizes_and_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="give kv_blocks or kv_memory_fraction, not both"):
        Settings().replace(kv_blocks=8, kv_memory_fraction=0.5)
    with pytest.raises(TypeError, match="unknown setting 'max_num_seq' .did you mean "
                                        "'max_num_seqs'"):
        Settings().replace(max_num_seq=4)
    with pytest.raises(TypeError, match="settings.disaggregation must be a "
                                        "DisaggregationSettings or None, got dict"):
        Settings(disaggregation={"prefill": 1})
    with pytest.raises(TypeError, match="settings.cache must be a CacheSettings, got dict"):
        Settings(cache={"block_size": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().cache.block_size = 8


def test_replace_builds_a_new_validated_tree_and_leaves_the_old_one():
    base = Settings()
    tuned = base.replace(max_num_seqs=4, block_size=8, sampling="replicated")
    assert tuned.scheduler == SchedulerSettings(max_num_seqs=4)
    assert tuned.cache == CacheSettings(block_size=8)
    assert tuned.sampling == SamplingSettings(mode="replicated")
    assert base == Settings() and tuned.parallel is base.parallel


def test_the_mode_vocabularies_are_those_the_engine_implements():
    from jaxserve.engine import output_processor, router
    from jaxserve.engine.step_builder import QUERY_TILE
    from jaxserve.ops import moe
    from jaxserve.runtime import step_sampling
    from jaxserve import settings

    assert settings.SAMPLING_MODES == step_sampling.SAMPLING_MODES
    assert SamplingSettings().mode == step_sampling.DEFAULT_SAMPLING
    assert settings.OUTPUT_PROCESSING_MODES == output_processor.OUTPUT_PROCESSING
    assert SamplingSettings().output_processing == output_processor.DEFAULT_OUTPUT_PROCESSING
    assert settings.MOE_STRATEGIES == moe.STRATEGIES
    assert settings.ROUTING_POLICIES == router.POLICIES
    assert settings.PREFILL_QUERY_TILE == QUERY_TILE


def test_building_the_cli_parser_imports_no_jax():
    code = ("import sys, jaxserve.cli as c; c.build_parser(); "
            "assert 'jax' not in sys.modules, 'jax was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_settings_and_flat_overrides_reach_the_engine(hf_model_dir):
    from jaxserve import LLM

    _, model_dir = hf_model_dir("llama")
    base = Settings().replace(max_model_len=64, max_num_seqs=4, block_size=8, kv_blocks=40,
                              routing="least_loaded")
    llm = LLM(model_dir, settings=base, max_num_batched_tokens=32, routing="round_robin")
    assert llm.settings.scheduler == SchedulerSettings(
        max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, routing="round_robin")
    assert llm.settings.cache == CacheSettings(block_size=8, kv_blocks=40)
    engine = llm.engine
    assert engine.settings is llm.settings and engine.config is llm.settings.scheduler
    assert engine.router.name == "round_robin"  # the override wins over the tree given
    assert engine.scheduler.max_num_batched_tokens == 32
    assert engine.builder.decode_buckets[-1] == 4 and llm.runner.block_size == 8
    assert llm.stats()["kv_blocks_total"] == 39  # 40 minus the null block
    with pytest.raises(TypeError, match="settings must be a jaxserve.settings.Settings"):
        LLM(model_dir, settings={"max_num_seqs": 4})


def test_resolved_settings_record_the_pool_and_max_model_len(hf_model_dir):
    """Left open, max_model_len and the pool size are decided at load; `llm.settings` says
    what was decided, and building an engine from it again needs no more choices."""
    from jaxserve import LLM

    _, model_dir = hf_model_dir("llama")
    llm = LLM(model_dir, max_num_seqs=2, block_size=8)
    assert llm.settings.scheduler.max_model_len == llm.max_model_len
    assert llm.settings.cache.kv_blocks == llm.runner.blocks_per_replica
    assert llm.settings.cache.kv_memory_fraction is None
