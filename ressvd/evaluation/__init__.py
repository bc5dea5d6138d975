from .perplexity import NonFiniteLogitsError, PerplexityResult, perplexity

__all__ = ["NonFiniteLogitsError", "PerplexityResult", "perplexity"]
