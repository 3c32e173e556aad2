"""sled-ext: fast, exact SLED (Self Logits Evolution Decoding) for PyTorch.

``torch.ops.sled.evolve`` and friends are registered on import; see :mod:`sled_ext.ops` for the
Python signatures and :mod:`sled_ext.reference` for the pure-PyTorch oracle."""
from . import reference
from .ops import evolve, evolve_logits, evolve_logits_topk, evolve_topk

__all__ = ["evolve", "evolve_logits", "evolve_logits_topk", "evolve_topk", "reference"]
