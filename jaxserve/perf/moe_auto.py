"""The engine's MoE `auto` threshold, from the performance model for the platform in use.

`auto` gathers expert weights for steps of more than a threshold of tokens and exchanges tokens
below it. The threshold is the performance model's crossover (`Deployment.moe_crossover_tokens`)
for this model, mesh and rules on the hardware profile of the devices the engine runs on, so
the engine and `plan` follow one rule. An explicit `moe_auto_threshold` wins; a device with no
profile falls back to `ops.moe.DEFAULT_AUTO_THRESHOLD` and says so in the source it returns.
"""

from __future__ import annotations

from jaxserve.config import ModelConfig
from jaxserve.perf.precision import Precision
from jaxserve.perf.profiles import load_hardware
from jaxserve.perf.step import Deployment
from jaxserve.rules import MeshRules

# (platform, words in the device kind) -> built-in profile; the first match wins.
DEVICE_PROFILES = (
    ("cpu", (), "cpu-local"),
    ("gpu", ("h200",), "h200"),
    ("gpu", ("h100",), "h100"),
    ("gpu", ("a100",), "a100-80gb"),
    ("tpu", ("v5 lite",), "tpu-v5e"),
    ("tpu", ("v5e",), "tpu-v5e"),
    ("tpu", ("v5p",), "tpu-v5p"),
)


def profile_for_device(platform: str, device_kind: str) -> str | None:
    """The built-in hardware profile of a device (`jax.devices()[0].platform`, `.device_kind`),
    or None when there is none."""
    kind = device_kind.lower()
    for plat, words, name in DEVICE_PROFILES:
        if platform == plat and all(w in kind for w in words):
            return name
    return None


def auto_threshold(config: ModelConfig, mesh: MeshRules, dtype: str, platform: str,
                   device_kind: str, fallback: int) -> tuple[int, str]:
    """(tokens per step above which `auto` gathers, where that number comes from) for a MoE
    model on `mesh` with weights in `dtype`, on devices of this platform and kind."""
    name = profile_for_device(platform, device_kind)
    if name is None:
        return fallback, (f"no hardware profile for {platform} device {device_kind!r}: the "
                          f"default {fallback}")
    d = Deployment(config, mesh.shape, mesh.rules, load_hardware(name), Precision(dtype))
    return d.moe_crossover_tokens(), f"the performance model's crossover on profile {name!r}"
