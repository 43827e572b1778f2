"""Causal sweeps over SAE latents (grid of targets x hook points x SAEs x prompt sets x methods)."""
