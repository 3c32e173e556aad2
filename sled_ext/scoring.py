"""Scoring continuations for multiple-choice evaluation (docs/algorithm.md, "Scoring
conventions").

A continuation's score is the sum, over its tokens, of the value the method assigns to the actual
next token: raw values (the published scripts' default, ``post_softmax=False``: raw final logits for
greedy, raw evolved logits for SLED with the lower bound outside the top-k, the DoLa contrast) or
log-probabilities (``post_softmax=True``). Only the continuation positions are projected.
"""
from __future__ import annotations

import math

import torch

from .decoding import Method, StepScorer, dola_contrast
from .models import adapt


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


def sled_target_values(values, tokens, targets, lower_bound, vocab, post_softmax):
    """The evolved value of each position's target token (``lower_bound`` outside the top-k);
    with ``post_softmax`` its log-softmax over the whole evolved vector (k values plus V - k
    copies of the lower bound)."""
    hit = tokens == targets[:, None]
    chosen = torch.where(hit.any(-1), (values * hit).sum(-1),
                         torch.full_like(values[:, 0], lower_bound))
    if not post_softmax:
        return chosen
    outside = vocab - values.shape[1]
    parts = [values]
    if outside:
        parts.append(torch.full_like(values[:, :1], lower_bound + math.log(outside)))
    return chosen - torch.logsumexp(torch.cat(parts, -1), -1)


def head_target_values(logits, targets, post_softmax, keep=None, relative_top_value=-1000.0,
                       rows=None):
    """Each target's value ``[P]`` from ``[U, V]`` scores (row ``rows[p]``, or row p): raw, or
    log-softmax with ``post_softmax``; tokens outside ``keep`` (DoLa's relative-top filter) get
    ``relative_top_value`` after the normalisation, as the published ``lm_score``."""
    targets = targets.to(logits.device)
    rows = torch.arange(len(targets), device=logits.device) if rows is None else rows
    values = logits[rows, targets]
    if post_softmax:
        values = values - logits.logsumexp(-1)[rows]
    if keep is not None:
        values = values.masked_fill(~keep[rows, targets], relative_top_value)
    return values


def _target_scores(scorer: StepScorer, final_hidden, targets, post_softmax, relative_top_value):
    name, adapter = scorer.method.name, scorer.adapter
    if name == "sled":
        values, tokens = scorer.topk(scorer.rows(final_hidden))
        return sled_target_values(values, tokens, targets, scorer.method.evolution_lower_bound,
                                  adapter.vocab, post_softmax)
    if name == "greedy":
        return head_target_values(adapter.head(final_hidden), targets, post_softmax)
    contrast, keep = dola_contrast(adapter.head(scorer.rows(final_hidden)),
                                   scorer.method.relative_top)
    return head_target_values(contrast, targets, post_softmax, keep, relative_top_value)


@torch.inference_mode()
def score(model, tokenizer, prompts, continuations, *, method="sled", evolution_rate=2.0,
          evolution_scale=10, evolution_lower_bound=-100.0, iterations=10, layers="all",
          premature_norm=False, post_softmax=False, relative_top=0.1, relative_top_value=-1000.0,
          batch_size=8, progress=None) -> list[float]:
    """The score of each (prompt, continuation) pair: the sum over continuation tokens of the
    method's value for the actual token. Defaults follow the published multiple-choice path
    (T = 10, lower bound -100, raw values). ``progress(done, total)`` is called after each batch."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    adapter = adapt(model)
    scorer = StepScorer(adapter, Method(method, evolution_rate, evolution_scale,
                                        evolution_lower_bound, iterations, layers,
                                        premature_norm, relative_top))
    device = adapter.weight.device
    pairs = [tokenize_pair(tokenizer, p, c) for p, c in zip(prompts, continuations)]
    out = []
    for first in range(0, len(pairs), batch_size):
        batch = pairs[first:first + batch_size]
        ids, mask, row, col = right_padded(batch, 0, device)
        targets = ids[row, col + 1]
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        with adapter.capture(scorer.layers, select=lambda hidden: hidden[row, col]):
            final = adapter.forward(ids, mask, positions)[row, col]
            values = _target_scores(scorer, final, targets, post_softmax, relative_top_value)
        totals = torch.zeros(len(batch), dtype=torch.float64)
        totals.index_add_(0, row.cpu(), values.double().cpu())
        out.extend(totals.tolist())
        if progress is not None:
            progress(len(out), len(pairs))
    return out
