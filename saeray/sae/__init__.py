"""Sparse autoencoders: six architectures on one training loop, SAELens-layout files.

``from saeray.sae import load, build, ARCHS``; training in :mod:`saeray.sae.train`.
"""
from .io import load, save
from .registry import ARCHS, build

__all__ = ["ARCHS", "build", "load", "save"]
