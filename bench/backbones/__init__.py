"""Backbone plugins (``bench.backbones.base``); importing the package registers the built-in ones."""
from bench.backbones import msdnet, vit  # noqa: F401  (registration side effect)
