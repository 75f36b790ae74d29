"""The error of a model that cannot be loaded, raised by loading and by adapters alike."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded: the message names what is wrong and what is supported."""
