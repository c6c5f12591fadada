"""Qwen3 dense: the Llama decoder plus RMSNorm over head_dim on q and k before RoPE, and an
explicit head_dim that need not equal hidden_size / num_heads. Both live in the shared layers
(`Attention` reads `config.qk_norm`), so this family only checks that it is asked for.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
        if not config.qk_norm:
            raise ValueError("a Qwen3 config must have qk_norm=True")
        super().__init__(config, dtype, rngs=rngs)
