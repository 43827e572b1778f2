"""saeray: distributed batch audits of LLM internals on Ray."""

__version__ = "0.1.0"
