"""The settings of one decoding method, in one frozen object: what ``generate``, ``score``,
``evaluate``, the tasks and the command line all carry (docs/algorithm.md, "Inputs of one step").
Like gpt-fast's ``ModelArgs``, it comes with presets: the published generation setting and the
published multiple-choice one."""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, replace

METHODS = ("greedy", "dola", "sled")


@dataclass(frozen=True)
class Method:
    """How a step's next-token values are formed. ``layers`` are the candidate premature layers
    (see :func:`sled_ext.models.candidate_layers`); ``premature_norm`` applies the final norm to
    their rows (logit lens). The defaults are the published generation setting."""
    name: str = "sled"
    _: KW_ONLY
    evolution_scale: int = 10  # k
    evolution_rate: float = 2.0  # alpha
    iterations: int = 1  # T
    evolution_lower_bound: float = -1000.0
    layers: object = "all"
    premature_norm: bool = False
    relative_top: float = 0.1  # DoLa: the tokens it may keep, p_N >= relative_top * max p_N
    relative_top_value: float = -1000.0  # DoLa, scoring: the value of every other token

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.name!r}")

    @classmethod
    def of(cls, method: str | Method = "sled", preset: Method | None = None,
           **settings) -> Method:
        """The keyword form of the public functions as one object: a ``Method`` as it is, a name
        with ``preset``'s settings (default the generation one); ``settings`` override either."""
        if isinstance(method, Method):
            return replace(method, **settings)
        return replace(preset or cls(), name=method, **settings)


# The published multiple-choice path: T = 10, lower bound -100 (raw scores).
MULTIPLE_CHOICE = Method(iterations=10, evolution_lower_bound=-100.0)
