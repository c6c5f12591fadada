"""jaxserve: a JAX/XLA SPMD inference engine for large language models."""

from jaxserve.api import LLM

__all__ = ["LLM"]
