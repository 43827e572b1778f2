"""Interpretation methods that need a language model outside the audited one (feature explainers,
judges/scorers). They all talk to it through :mod:`saeray.interp.client`, an OpenAI-compatible chat
client with bounded retries, timeouts and concurrency (docs/llm.md)."""
