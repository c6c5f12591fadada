"""jaxserve: a JAX/XLA SPMD inference engine for large language models."""

from jaxserve.api import LLM
from jaxserve.outputs import CandidateScore, CompletionOutput, RequestOutput, ScoreOutput
from jaxserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ScoreOutput",
           "CandidateScore"]
