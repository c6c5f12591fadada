"""jaxserve: a JAX/XLA SPMD inference engine for large language models.

The public names load on first use, so tools that need no devices (`jaxserve.config`,
`jaxserve.flops`, `jaxserve.rules`, the planner in `jaxserve.perf`) import without jax.
"""

import importlib

_PUBLIC = {"LLM": "jaxserve.api", "SamplingParams": "jaxserve.sampling_params",
           "RequestOutput": "jaxserve.outputs", "CompletionOutput": "jaxserve.outputs",
           "ScoreOutput": "jaxserve.outputs", "CandidateScore": "jaxserve.outputs"}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
