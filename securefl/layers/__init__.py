"""Middleware layers (DP, secure aggregation, signing) composed by the runtime around protocols."""

from securefl.layers.base import Layer, LayerSetupError, Rejected

__all__ = ["Layer", "LayerSetupError", "Rejected"]
