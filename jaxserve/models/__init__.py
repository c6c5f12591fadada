"""Model families. `build_model` is the one place that maps a config's family to its module."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from jaxserve.models.llama import LlamaForCausalLM
from jaxserve.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from jaxserve.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM,
                 "qwen3_moe": Qwen3MoeForCausalLM, "mixtral": MixtralForCausalLM,
                 "deepseek_v2": DeepseekV2ForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM}


def build_model(config: ModelConfig, dtype=jnp.float32, seed: int = 0) -> nnx.Module:
    """A randomly initialised model (real arrays, unsharded)."""
    with nnx.use_eager_sharding(False):
        return MODEL_CLASSES[config.family](config, dtype, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig, dtype=jnp.float32) -> nnx.Module:
    """The model's structure with shape/dtype placeholders instead of arrays (costs nothing)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: MODEL_CLASSES[config.family](config, dtype,
                                                                   rngs=nnx.Rngs(0)))
