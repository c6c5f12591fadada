"""The output-processing default: "auto" resolves by platform, inline on cpu, a worker thread on
accelerators (see jaxserve/engine/output_processor.py's check_mode)."""

import pytest

from jaxserve.engine.output_processor import DEFAULT_OUTPUT_PROCESSING, check_mode


@pytest.mark.parametrize("platform,mode", [("cpu", "inline"), ("gpu", "thread"),
                                           ("tpu", "thread")])
def test_auto_resolves_by_platform(platform, mode):
    assert check_mode("auto", platform) == mode


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_an_explicit_mode_wins_on_every_platform(mode):
    assert {check_mode(mode, p) for p in ("cpu", "gpu", "tpu")} == {mode}


def test_the_default_is_auto_and_an_engine_on_cpu_processes_inline():
    from jaxserve import LLM
    from jaxserve.package_data import embedded_model

    assert DEFAULT_OUTPUT_PROCESSING == "auto" and check_mode("auto") == "inline"
    assert LLM(embedded_model(), max_model_len=64).engine.output.mode == "inline"


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match=r"one of auto, inline, thread, got 'process'"):
        check_mode("process", "gpu")
