"""Evaluation: perplexity under the GPTQ protocol and KL divergence to a reference model."""

from .perplexity import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
