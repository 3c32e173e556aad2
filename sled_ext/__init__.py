"""sled-ext: fast, exact SLED (Self Logits Evolution Decoding) for PyTorch.

``torch.ops.sled.evolve`` and friends are registered on import (:mod:`sled_ext.ops`);
:mod:`sled_ext.reference` is the pure-PyTorch oracle. Decoding and scoring for Hugging Face causal
LMs (:func:`generate`, :func:`score`) need ``transformers`` and load on first use."""
from . import reference
from .method import MULTIPLE_CHOICE, Method
from .ops import (combine, cpu_kernels, evolve, evolve_logits, evolve_logits_topk, evolve_topk,
                  partials, partials_logits)

__all__ = ["evolve", "evolve_logits", "evolve_logits_topk", "evolve_topk", "partials",
           "partials_logits", "combine", "cpu_kernels", "reference",
           "Method", "MULTIPLE_CHOICE", "generate", "custom_generate", "score", "adapt"]


def __getattr__(name):  # transformers is imported only by those who decode or score
    if name in ("generate", "custom_generate"):
        from . import decoding
        return getattr(decoding, name)
    if name == "score":
        from .scoring import score
        return score
    if name == "adapt":
        from .models import adapt
        return adapt
    raise AttributeError(name)
