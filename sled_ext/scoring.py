"""Scoring continuations for multiple-choice evaluation (docs/algorithm.md, "Scoring
conventions").

A continuation's score is the sum, over its tokens, of the value the method assigns to the actual
next token: raw values (the published scripts' default, ``post_softmax=False``: raw final logits for
greedy, raw evolved logits for SLED with the lower bound outside the top-k, the DoLa contrast) or
log-probabilities (``post_softmax=True``). Only the continuation positions are projected.

:func:`score` scores a list of pairs under one method; :class:`ChoiceScorer` scores one item's
continuations under many methods and settings from one forward pass (``sled eval``, ``sled
tune``). Both run their forward through :func:`continuation_hidden`.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from . import ops
from .decoding import NextToken, StepScorer
from .method import MULTIPLE_CHOICE, Method
from .models import adapt
from .phases import evolve
from .tasks import CONVENTIONS

def tokenize_pair(tokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of prompt + continuation and where the continuation starts, as the published
    scripts compute it (the prompt tokenized on its own gives the split)."""
    full = tokenizer(prompt + continuation).input_ids
    start = len(tokenizer(prompt).input_ids)
    if not 0 < start < len(full):
        raise ValueError(f"continuation {continuation!r} adds no tokens after prompt {prompt!r}")
    return full, start


def right_padded(pairs, shared: int, device):
    """A right-padded batch of ``(ids, start)`` pairs (see :func:`tokenize_pair`) whose first
    ``shared`` tokens are already in a KV cache: ``ids`` ``[B, width]`` (the rest of each
    sequence), ``mask`` ``[B, shared + width]``, and ``(row, col)``, the batch positions whose
    next token is a continuation token. Right padding keeps positions plain."""
    width = max(len(tokens) for tokens, _ in pairs) - shared
    ids = torch.zeros(len(pairs), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(pairs), shared + width, dtype=torch.long, device=device)
    mask[:, :shared] = 1
    row, col = [], []
    for b, (tokens, start) in enumerate(pairs):
        rest = tokens[shared:]
        ids[b, :len(rest)] = torch.tensor(rest)
        mask[b, shared:shared + len(rest)] = 1
        row += [b] * (len(tokens) - start)
        col += range(start - 1 - shared, len(tokens) - 1 - shared)
    return (ids, mask, torch.tensor(row, device=device, dtype=torch.long),
            torch.tensor(col, device=device, dtype=torch.long))


def continuation_hidden(adapter, layers, pairs, *, share=False):
    """One forward over ``(ids, start)`` pairs (see :func:`tokenize_pair`): the final hidden
    states ``[U, H]`` at the positions whose next token is a continuation token, with ``layers``
    captured there (read them with ``adapter.premature_rows``); and for each of the P
    continuation tokens its id, its pair (on the CPU) and which of the U positions predicts it
    (``[P]`` each). With ``share`` the prefix all pairs share runs once (KV cache) and positions
    whose inputs are identical (continuations that begin alike) are computed once; without it
    U = P."""
    device = adapter.weight.device
    shared, cache = 0, None
    if share:
        # The position before each continuation's first token must stay in the batch, since its
        # hidden state is scored.
        shared = min(_common_prefix([ids for ids, _ in pairs]), min(s for _, s in pairs) - 1)
    if shared > 0:
        prefix = torch.tensor([pairs[0][0][:shared]], device=device)
        cache = DynamicCache(config=adapter.model.config)
        adapter.forward(prefix, torch.ones_like(prefix),
                        torch.arange(shared, device=device)[None], cache)
        cache.batch_repeat_interleave(len(pairs))
    ids, mask, row, col = right_padded(pairs, shared, device)
    if share:
        first, source = _distinct_inputs(ids, row, col)
        selected = (row[first], col[first])
    else:
        source, selected = torch.arange(len(row)), (row, col)
    positions = (shared + torch.arange(ids.shape[1], device=device)).expand_as(ids)
    with adapter.capture(layers, select=lambda hidden: hidden[selected]):
        final = adapter.forward(ids, mask, positions, cache)[selected]
    return final, ids[row, col + 1], row.cpu(), source.to(adapter.weight.device)


def _distinct_inputs(ids, row, col):
    """Positions ``(row, col)`` of ``ids`` whose inputs so far are the same (continuations that
    begin alike) have the same hidden state: the first of each kind and, per position, which of
    those it repeats."""
    first, source, seen, sequences = [], [], {}, ids.tolist()
    for p, (b, c) in enumerate(zip(row.tolist(), col.tolist())):
        key = tuple(sequences[b][:c + 1])
        if key not in seen:
            seen[key] = len(first)
            first.append(p)
        source.append(seen[key])
    return (torch.tensor(first, device=ids.device, dtype=torch.long),
            torch.tensor(source, dtype=torch.long))


def _common_prefix(sequences) -> int:
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return n


@torch.inference_mode()
def score(model, tokenizer, prompts, continuations, *, method: str | Method = "sled",
          post_softmax=False, batch_size=8, progress=None, **settings) -> list[float]:
    """The score of each (prompt, continuation) pair: the sum over continuation tokens of the
    method's value for the actual token. ``method``: a :class:`~sled_ext.method.Method`, or its
    name with the published multiple-choice setting (T = 10, lower bound -100); ``settings``
    (any field of ``Method``) override either. ``progress(done, total)`` is called after each
    batch."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    adapter = adapt(model)
    scorer = StepScorer(adapter, Method.of(method, MULTIPLE_CHOICE, **settings))
    pairs = [tokenize_pair(tokenizer, p, c) for p, c in zip(prompts, continuations)]
    out = []
    for first in range(0, len(pairs), batch_size):
        batch = pairs[first:first + batch_size]
        final, targets, owner, source = continuation_hidden(adapter, scorer.layers, batch)
        values = scorer.next_token(final).at(targets, post_softmax, source)
        totals = torch.zeros(len(batch), dtype=torch.float64)
        totals.index_add_(0, owner, values.double().cpu())
        out.extend(totals.tolist())
        if progress is not None:
            progress(len(out), len(pairs))
    return out


class ChoiceScorer:
    """Scores every continuation of a :class:`tasks.ChoiceItem` under several methods from one
    forward pass. ``methods`` maps a label to a :class:`~sled_ext.method.Method` (any mix of
    greedy, DoLa and SLED settings; they share the forward, so they share ``premature_norm``).
    Returns ``{label: {"raw": [...], "logprob": [...]}}`` with the true continuations first,
    then the false ones.

    Every row's logits, ``[R, chunk, V]`` at a time, are projected once: greedy reads the final
    row, DoLa contrasts the rows, and SLED folds them with ``sled.partials_logits``, whose
    candidates serve any number of ``(layers, k)`` choices through ``sled.combine`` and any
    number of rates through the evolution step."""

    def __init__(self, model, tokenizer, methods: dict[str, Method], *, chunk=64):
        self.adapter, self.tokenizer = adapt(model), tokenizer
        norms = {m.premature_norm for m in methods.values() if m.name != "greedy"}
        if len(norms) > 1:
            raise ValueError("the methods of one forward must agree on premature_norm")
        # Positions per projection: wide GEMMs, [R, chunk, V] logits.
        self.chunk = chunk
        # Every candidate layer is captured once; each method reads the rows of its own layers.
        self.captured = StepScorer(self.adapter, Method(layers="all",
                                                        premature_norm=norms.pop() if norms
                                                        else False))
        self.scorers = {label: StepScorer(self.adapter, m) for label, m in methods.items()}
        self.rows_of = {label: self._row_indices(scorer.layers)
                        for label, scorer in self.scorers.items()}
        self.sled = {label: m for label, m in methods.items() if m.name == "sled"}
        if self.sled and max(m.evolution_scale for m in self.sled.values()) > self.adapter.vocab:
            raise ValueError(f"evolution_scale (k) must be <= the vocabulary "
                             f"({self.adapter.vocab})")

    def _row_indices(self, layers) -> list[int]:
        """Indices into the captured ``[all premature layers..., final]`` rows for a layer set."""
        captured = self.captured.layers
        return [captured.index(layer) for layer in layers] + [len(captured)]

    @torch.inference_mode()
    def __call__(self, item) -> dict:
        continuations = list(item.true) + list(item.false)
        rows, targets, owner, source = self.forward(item.prompt, continuations)
        per_position = self.values(rows, targets, source)
        out = {}
        for label, by_convention in per_position.items():
            out[label] = {}
            for convention, values in by_convention.items():
                totals = torch.zeros(len(continuations), dtype=torch.float64)
                totals.index_add_(0, owner, values.double().cpu())
                out[label][convention] = totals.tolist()
        return out

    def forward(self, prompt, continuations):
        """The one forward for every continuation of ``prompt``: the captured rows ``[R, U, H]``
        and, per continuation token, its id, its continuation and its row (see
        :func:`continuation_hidden`)."""
        pairs = [tokenize_pair(self.tokenizer, prompt, c) for c in continuations]
        final, targets, owner, source = continuation_hidden(self.adapter, self.captured.layers,
                                                            pairs, share=True)
        return self.captured.rows(final), targets, owner, source

    def values(self, rows, targets, source):
        """``{label: {convention: [P]}}``: each target's value per method (``source``: the row
        that predicts it)."""
        values, parts = {}, []
        k_max = max((m.evolution_scale for m in self.sled.values()), default=0)

        def add(label, mine, by_convention):
            for c, v in by_convention.items():
                values.setdefault(label, {}).setdefault(c, v.new_empty(len(targets)))[mine] = v

        for first in range(0, rows.shape[1], self.chunk):
            logits = self.adapter.head(rows[:, first:first + self.chunk])  # scaled, soft-capped
            mine = ((source >= first) & (source < first + logits.shape[1])).nonzero()[:, 0]
            local, wanted = source[mine] - first, targets[mine]
            for label, scorer in self.scorers.items():
                if label in self.sled:
                    continue
                index = self.rows_of[label]
                own = logits[index] if len(index) < len(logits) else logits
                next_token = scorer.from_logits(own)
                add(label, mine, {c: next_token.at(wanted, c == "logprob", local)
                                  for c in CONVENTIONS})
            if self.sled:
                keep_final = any(m.iterations > 1 for m in self.sled.values())
                parts.append(ops.partials_logits(logits, evolution_scale=k_max,
                                                 keep_final=keep_final))
        if self.sled:
            values.update(self._sled([torch.cat(p) for p in zip(*parts)], targets, source))
        return values

    def _sled(self, partials, targets, source):
        """docs/algorithm.md steps 1-5 for every SLED setting from the partials of the whole
        vocabulary."""
        stats, argmax, values, tokens, premature, final_rows = partials
        out, selected = {}, {}
        for label, m in self.sled.items():
            key = (tuple(self.rows_of[label]), m.evolution_scale)
            if key not in selected:  # steps 1-4 for this layer set and k
                index = torch.tensor(self.rows_of[label], device=stats.device)
                selected[key] = ops.combine(
                    stats[:, index][None], argmax[:, index][None], values[None], tokens[None],
                    premature[:, :, index[:-1]][None], evolution_scale=m.evolution_scale)
            top_tokens, top_values, delta, softmax = selected[key]
            evolved = evolve(top_values, delta, softmax, m.evolution_rate, m.iterations,
                             final_rows, top_tokens)
            next_token = NextToken(m, self.adapter.vocab, values=evolved, tokens=top_tokens)
            out[label] = {c: next_token.at(targets, c == "logprob", source)
                          for c in CONVENTIONS}
        return out
