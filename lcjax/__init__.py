"""lcjax: a JAX research library for long-context transformers."""
__version__ = "0.1.0"
