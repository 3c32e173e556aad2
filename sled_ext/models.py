"""Model adapters: what SLED needs from a Hugging Face causal LM.

For the positions being decoded or scored, and only those, an adapter yields the stacked rows
``[R, P, H]`` the op takes: the premature rows (candidate layers' hidden states, raw residual
stream by default, as the published code) and the final row (the model's own normed output). It
also carries the vocab head's weight and bias and the model's logit post-processing.

Layer numbering follows ``output_hidden_states``: layer 0 is the embedding output (the input of the
first decoder block), layer ``l`` the output of block ``l``; the final row is the normed output of
the last block, so the candidate premature layers are ``0 .. num_layers - 1``.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

# Where the decoder blocks and the final norm live, by attribute name on the base model.
_BLOCKS = ("layers", "h", "blocks")
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


class UnsupportedModel(ValueError):
    """The model lacks something SLED needs; the message says what."""


def _first_attr(module, names):
    for name in names:
        found = getattr(module, name, None)
        if found is not None:
            return found
    return None


def candidate_layers(spec, num_layers: int) -> list[int]:
    """``"all"`` (embedding output and every block below the last), an explicit list,
    ``"stride:S"``: every S-th layer counting down from the final one (N - S, N - 2S, ... >= 0),
    or ``"top-half"``: layers N // 2 to N - 1; the last two are cheaper subsets."""
    if spec == "all":
        return list(range(num_layers))
    if spec == "top-half":
        return list(range(num_layers // 2, num_layers))
    if isinstance(spec, str) and spec.startswith("stride:"):
        stride = int(spec.split(":", 1)[1])
        if stride < 1:
            raise ValueError(f"layers stride must be >= 1, got {stride}")
        return sorted(range(num_layers - stride, -1, -stride))
    if isinstance(spec, str):
        raise ValueError(f'layers must be "all", "stride:S", "top-half" or a list of ints, '
                         f'got {spec!r}')
    layers = sorted(set(int(layer) for layer in spec))
    if not layers:
        raise ValueError("layers is empty: SLED needs at least one premature layer")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"premature layers must be in [0, {num_layers - 1}] for this model "
                         f"({num_layers} blocks; the last block is the final row), got {bad}")
    return layers


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of a head split along the vocab (tensor parallelism)."""
    group: object                # the torch.distributed group of the split
    offset: int                  # the slice's first token


def _vocab_shard(weight) -> VocabShard | None:
    """The vocab slice of a DTensor head (``tp_plan="auto"``), None for a plain tensor."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:
        return None
    if not isinstance(weight, DTensor):
        return None
    if weight.device_mesh.ndim != 1 or weight.placements != (Shard(0),):
        raise UnsupportedModel(f"the vocab head is split as {weight.placements} over a "
                               f"{weight.device_mesh.ndim}-D mesh; SLED supports one vocab split "
                               "(Shard(0))")
    import torch.distributed as dist
    group = weight.device_mesh.get_group()
    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, weight.to_local().shape[0], group=group)
    return VocabShard(group, sum(sizes[:dist.get_rank(group)]))


@dataclass
class Adapter:
    model: nn.Module
    decoder: nn.Module           # the base model: input ids -> normed last hidden state
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    head_module: nn.Module       # the model's vocab head (with any tensor-parallel gathering)
    weight: torch.Tensor         # [V, H], or this rank's [V_r, H] under a vocab split
    bias: torch.Tensor | None
    vocab: int                   # V, the whole vocabulary
    vocab_shard: VocabShard | None
    logit_scale: float
    softcap: float
    cache_kwarg: str             # "cache" (transformers >= 5.2x) or "past_key_values"
    _captured: dict = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @contextlib.contextmanager
    def capture(self, layers: list[int], select):
        """Within the block, each forward of the decoder records ``select(hidden)`` (``[B, S, H]``
        -> ``[P, H]``) for every layer in ``layers``; read them with :meth:`premature_rows`."""
        self._captured.clear()
        hooks = []

        def keep(layer):
            def hook(hidden):
                self._captured[layer] = select(hidden)
            return hook

        for layer in layers:
            record = keep(layer)
            if layer == 0:
                hooks.append(self.blocks[0].register_forward_pre_hook(
                    lambda _m, args, kwargs, record=record: record(
                        args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
            else:
                hooks.append(self.blocks[layer - 1].register_forward_hook(
                    lambda _m, _args, out, record=record: record(
                        out[0] if isinstance(out, tuple) else out)))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def premature_rows(self, layers: list[int], premature_norm: bool = False) -> torch.Tensor:
        """``[L, P, H]`` from the last captured forward, in the order of ``layers``, on the vocab
        head's device (layers may sit on other devices under ``device_map``)."""
        missing = [layer for layer in layers if layer not in self._captured]
        if missing:
            raise RuntimeError(f"no hidden states captured for layers {missing}")
        device = self.weight.device
        rows = torch.stack([self._captured[layer].to(device) for layer in layers])
        if premature_norm:
            if self.final_norm is None:
                raise UnsupportedModel("premature_norm=True but the model has no final norm")
            rows = self.final_norm(rows).to(device)
        return rows

    def forward(self, input_ids, attention_mask, position_ids, cache=None):
        """The base model's forward (no vocab head): ``[B, S, H]`` normed last hidden states."""
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": cache is not None}
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        return self.decoder(input_ids=input_ids, **kwargs).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own logits for final hidden states (float32), post-processing included."""
        logits = self.head_module(hidden.to(self.weight.device)).float()
        if self.logit_scale != 1.0:  # a pass over [rows, V] most models do not need
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def adapt(model: nn.Module) -> Adapter:
    """An :class:`Adapter` for a Hugging Face causal LM, or :class:`UnsupportedModel` naming
    what is missing."""
    name = type(model).__name__
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = _first_attr(model, ("model", "transformer", "gpt_neox"))
    if decoder is None:
        raise UnsupportedModel(f"{name}: no base model (get_decoder(), .model, .transformer)")
    blocks = _first_attr(decoder, _BLOCKS)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) < 1:
        raise UnsupportedModel(f"{name}: no list of decoder blocks (looked for "
                               f"{', '.join(_BLOCKS)} on {type(decoder).__name__})")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UnsupportedModel(f"{name}: the vocab head is {type(head).__name__}, not nn.Linear")
    shard = _vocab_shard(head.weight)
    weight, bias = head.weight, head.bias
    if shard is not None:
        weight = weight.to_local()
        bias = None if bias is None else bias.to_local()
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    params = inspect.signature(decoder.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    return Adapter(model=model, decoder=decoder, blocks=blocks,
                   final_norm=_first_attr(decoder, _FINAL_NORMS), head_module=head,
                   weight=weight, bias=bias, vocab=head.out_features, vocab_shard=shard,
                   logit_scale=scale,
                   softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
                   cache_kwarg=cache_kwarg)
