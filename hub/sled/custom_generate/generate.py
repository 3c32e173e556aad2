"""SLED (Self Logits Evolution Decoding, Zhang et al., NeurIPS 2024) for ``model.generate``.

Loaded by ``model.generate(..., custom_generate=<this repo>, trust_remote_code=True)``. The
decoding itself is sled-ext's (``sled_ext.custom_generate``): this file only routes the SLED
settings to it and hands everything else to transformers' ``generate``, which prepares the inputs,
logits processors and stopping criteria as it does for its own methods.
"""
from dataclasses import fields

from transformers import GenerationMixin

from sled_ext import Method, custom_generate

# The settings of sled_ext.generate (its Method, less the method's name: that is ``method``).
SETTINGS = tuple(field.name for field in fields(Method) if field.name != "name")


def generate(model, *args, method="sled", **kwargs):
    """``method``: "sled" (default), "dola" or "greedy"; the settings ``SETTINGS`` (for example
    ``evolution_rate``, ``evolution_scale``, ``layers``) have sled_ext.generate's names and
    defaults; every other argument is transformers' ``generate``'s."""
    settings = {name: kwargs.pop(name) for name in SETTINGS if name in kwargs}
    return GenerationMixin.generate(model, *args, **kwargs,
                                    custom_generate=custom_generate(method, **settings))
