"""SLED, DoLa and greedy decoding for Hugging Face causal LMs: the next-token scores of one step,
the decoding loop (prefill, decode one token, pick: gpt-fast style) and its ``model.generate``
integration."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache
from transformers.generation import (EosTokenCriteria, LogitsProcessorList,
                                     RepetitionPenaltyLogitsProcessor, StoppingCriteriaList,
                                     StopStringCriteria, TemperatureLogitsWarper,
                                     TopPLogitsWarper)

from . import distributed, ops
from .method import Method
from .models import Adapter, adapt, candidate_layers


@dataclass
class NextToken:
    """A method's values for the next token at P positions: dense ``scores`` ``[P, V]`` (greedy's
    logits, DoLa's contrast with ``keep``, its relative-top mask), or SLED's evolved candidates
    ``values``, ``tokens`` ``[P, k]`` with ``method.evolution_lower_bound`` everywhere else."""
    method: Method
    vocab: int
    scores: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    values: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """``[P, V]`` for decoding; DoLa's filtered tokens get -inf."""
        if self.scores is None:
            full = self.values.new_full((self.values.shape[0], self.vocab),
                                        self.method.evolution_lower_bound)
            return full.scatter_(1, self.tokens, self.values)
        return self.scores if self.keep is None else self.scores.masked_fill(~self.keep,
                                                                              float("-inf"))

    def at(self, targets: torch.Tensor, post_softmax: bool, rows=None) -> torch.Tensor:
        """The value of each target token ``[P]`` (position ``rows[p]``, or p): raw, or its
        log-softmax over the whole vector with ``post_softmax``; DoLa's filtered tokens get
        ``method.relative_top_value`` after the normalisation, as the published ``lm_score``."""
        if self.scores is None:
            values, tokens = ((self.values, self.tokens) if rows is None
                              else (self.values[rows], self.tokens[rows]))
            return _candidate_values(values, tokens, targets, self.method.evolution_lower_bound,
                                     self.vocab, post_softmax)
        logits = self.scores
        targets = targets.to(logits.device)
        rows = torch.arange(len(targets), device=logits.device) if rows is None else rows
        values = logits[rows, targets]
        if post_softmax:
            values = values - logits.logsumexp(-1)[rows]
        if self.keep is not None:
            values = values.masked_fill(~self.keep[rows, targets], self.method.relative_top_value)
        return values


def _candidate_values(values, tokens, targets, lower_bound, vocab, post_softmax):
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


class StepScorer:
    """Next-token values for P positions from the final hidden states and the premature rows the
    adapter captured in the same forward: the one place where greedy, DoLa and SLED part ways.
    :meth:`scores` reads only the adapter's head: ``num_layers``, ``vocab``, ``weight``,
    ``bias``, ``vocab_shard``, ``logit_scale``, ``softcap`` and ``head()``, so a serving engine
    that stacks the rows itself passes an object with just those (``vllm_plugin._VllmHead``)."""

    def __init__(self, adapter: Adapter, method: Method):
        self.adapter, self.method = adapter, method
        self.layers = ([] if method.name == "greedy"
                       else candidate_layers(method.layers, adapter.num_layers))

    def rows(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """``[R, P, H]``: premature rows then the final row, on the vocab head's device (moved
        there once per step when the model spans devices)."""
        premature = self.adapter.premature_rows(self.layers, self.method.premature_norm)
        return torch.cat([premature, final_hidden.to(premature.device)[None]])

    def __call__(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """``[P, V]`` float32 scores of a decoding step."""
        return self.next_token(final_hidden).dense()

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """SLED or DoLa scores from the stacked rows. No host synchronisation and no
        data-dependent Python: a step compiles with ``fullgraph=True`` or captures in a CUDA
        graph."""
        return self.from_rows(rows).dense()

    def next_token(self, final_hidden: torch.Tensor) -> NextToken:
        """The method's values from the last forward (``final_hidden`` ``[P, H]``)."""
        if self.method.name == "greedy":  # the final row alone
            return self.from_logits(self.adapter.head(final_hidden)[None])
        return self.from_rows(self.rows(final_hidden))

    def from_rows(self, rows: torch.Tensor) -> NextToken:
        """The method's values from the stacked rows ``[R, P, H]`` (premature rows first)."""
        if self.method.name == "sled":  # fused: the [R, P, V] logits never exist
            values, tokens = self.topk(rows)
            return NextToken(self.method, self.adapter.vocab, values=values, tokens=tokens)
        return self.from_logits(self.adapter.head(rows))

    def from_logits(self, logits: torch.Tensor) -> NextToken:
        """Greedy or DoLa from the rows' logits ``[R, P, V]`` (premature rows first), for callers
        that share one projection among methods."""
        if self.method.name == "greedy":
            return NextToken(self.method, self.adapter.vocab, scores=logits[-1])
        if self.method.name == "dola":
            contrast, keep = dola_contrast(logits, self.method.relative_top)
            return NextToken(self.method, self.adapter.vocab, scores=contrast, keep=keep)
        raise ValueError("SLED's values come from the fused op (topk), not from logits")

    def topk(self, rows: torch.Tensor):
        """SLED's evolved candidates ``(values, tokens)`` ``[P, k]``; over the ranks of a
        vocab-split head when the model is tensor-parallel."""
        m, a = self.method, self.adapter
        kwargs = dict(evolution_scale=m.evolution_scale, evolution_rate=m.evolution_rate,
                      iterations=m.iterations, logit_scale=a.logit_scale, softcap=a.softcap)
        if a.vocab_shard is None:
            return ops.evolve_topk(rows, a.weight, a.bias, **kwargs)
        return distributed.evolve_topk(rows, a.weight, a.bias, vocab_offset=a.vocab_shard.offset,
                                       group=a.vocab_shard.group, vocab_size=a.vocab, **kwargs)


def dola_contrast(logits: torch.Tensor, relative_top: float = 0.1):
    """DoLa (Chuang et al. 2024) from ``[R, P, V]`` logits, premature rows first. Per position the
    premature row with the largest Jensen-Shannon divergence to the final row is the base; returns
    ``log p_N - log p_base`` ``[P, V]`` and the relative-top mask of the tokens it may keep
    (``p_N >= relative_top * max p_N``). Unlike transformers' ``_dola_decoding``, which averages the
    divergence over the batch, each position picks its own layer, so a batch decodes as its rows
    would alone."""
    final = logits[-1].float()
    log_final = final.log_softmax(-1)
    # A CPU takes two positions at a time, so that every layer's [2, V] temporaries stay in its
    # cache (1.3x over 8 at V = 262k); a GPU takes them all at once.
    step = 2 if logits.device.type == "cpu" else max(logits.shape[1], 1)
    chosen = torch.cat([_most_divergent(rows, log_rows) for rows, log_rows
                        in zip(logits.split(step, dim=1), log_final.split(step))])  # [P]
    base = logits[:-1].gather(0, chosen[None, :, None].expand(1, *final.shape))[0]
    base = base.float().log_softmax(-1)
    keep = log_final >= log_final.max(-1, keepdim=True).values + math.log(relative_top)
    return log_final - base, keep


def _most_divergent(logits: torch.Tensor, log_final: torch.Tensor) -> torch.Tensor:
    """Per position, the premature row of ``logits`` ``[R, P, V]`` with the largest
    Jensen-Shannon divergence to the final row (whose log-softmax is ``log_final``)."""
    # softmax, as the published code, not exp(log_softmax): a CPU's exp takes a slow path below
    # -87 (a float's underflow), where most of a raw premature row's log-probabilities lie.
    p_final = logits[-1].float().softmax(-1)
    # One layer at a time: [P, V] temporaries stay in cache where [L, P, V] ones would not (2x on
    # a CPU at V = 262k), and each value is computed as the whole-stack expression would.
    js = []
    for layer in logits[:-1]:
        layer = layer.float()
        log_layer = layer.log_softmax(-1)
        mean = 0.5 * (p_final + layer.softmax(-1))
        # F.kl_div(x, mean) is xlogy(mean, mean) - mean * x; both terms share the xlogy.
        entropy = torch.xlogy(mean, mean)
        js.append(0.5 * ((entropy - mean * log_final).mean(-1)
                         + (entropy - mean * log_layer).mean(-1)))
    return torch.stack(js).argmax(0)


def _pick(scores: torch.Tensor, do_sample: bool, generator) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def decode(adapter: Adapter, scorer: Callable, input_ids: torch.Tensor, attention_mask,
           processors, stopping, *, max_new_tokens: int, do_sample: bool, pad_token_id: int,
           generator=None, on_tokens: Callable | None = None,
           drop_finished: bool = False) -> torch.Tensor:
    """The loop: prefill once, then one token per step for the whole batch with a KV cache.
    Rows that stop emit ``pad_token_id`` from then on; the loop ends when all rows stop. With
    ``drop_finished`` stopped rows also leave the batch (KV cache and all), so the rows still
    running cost what they would alone; only for processors and stopping criteria that read each
    row by itself (no per-batch-index state), as :func:`generate`'s."""
    ids = input_ids
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=adapter.model.config)
    layers = getattr(scorer, "layers", [])
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    live = torch.arange(ids.shape[0], device=ids.device)  # the rows in the forward batch
    with adapter.capture(layers, select=lambda hidden: hidden[:, -1]):
        hidden = adapter.forward(ids, mask, positions, cache)[:, -1]  # prefill
        for step in range(1, max_new_tokens + 1):
            scores = processors(ids[live], scorer(hidden).to(ids.device))
            picked = _pick(scores, do_sample, generator).masked_fill(done[live], pad_token_id)
            token = torch.full_like(done, pad_token_id, dtype=ids.dtype).index_copy_(0, live,
                                                                                     picked)
            ids = torch.cat([ids, token[:, None]], dim=-1)
            if on_tokens is not None:
                on_tokens(token)
            done[live] |= stopping(ids[live], scores)
            running = ~done[live]
            running_now = int(running.sum())
            if running_now == 0 or step == max_new_tokens:
                break
            if drop_finished and running_now < len(live):
                keep = running.nonzero()[:, 0]
                live, mask, positions = live[keep], mask[keep], positions[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            positions = positions[:, -1:] + 1
            hidden = adapter.forward(ids[live, -1:], mask, positions, cache)[:, -1]
    return ids


def generate(model, input_ids, attention_mask=None, *, method: str | Method = "sled",
             max_new_tokens=64, do_sample=False, temperature=1.0, top_p=1.0,
             repetition_penalty=1.0, eos_token_id=None, pad_token_id=None, stop_strings=None,
             tokenizer=None, streamer=None, callback=None, generator=None,
             **settings) -> torch.LongTensor:
    """Generate with SLED (default), DoLa or greedy on any supported Hugging Face causal LM.

    ``method``: a :class:`~sled_ext.method.Method`, or its name with the published generation
    setting; ``settings`` (``evolution_rate=``, ``layers=``... any field of ``Method``) override
    either. ``input_ids`` ``[B, S]`` (left-padded for batches, with ``attention_mask``). Returns
    ``[B, S + new]``. Sampling uses ``temperature`` and ``top_p`` when ``do_sample``;
    ``repetition_penalty`` 1.01-1.05 is what the SLED authors recommend for open-ended text.
    Generation stops per row at ``eos_token_id`` (default: the model's) or any of ``stop_strings``
    (needs ``tokenizer``). ``streamer`` (transformers' ``BaseStreamer``) gets every new token;
    ``callback(tokens)`` gets each step's ``[B]`` tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    adapter = adapt(model)
    scorer = StepScorer(adapter, Method.of(method, **settings))
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if do_sample and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    config = model.generation_config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    stopping = StoppingCriteriaList()
    if eos is not None:
        stopping.append(EosTokenCriteria(eos))
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer")
        stopping.append(StopStringCriteria(tokenizer, stop_strings))
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None:
        pad_token_id = (eos if isinstance(eos, int) else (eos or [0])[0])

    def on_tokens(tokens):
        if streamer is not None:
            streamer.put(tokens.cpu())
        if callback is not None:
            callback(tokens)

    if streamer is not None:
        streamer.put(input_ids.cpu())
    out = decode(adapter, scorer, input_ids, attention_mask, processors, stopping,
                 max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id,
                 generator=generator, on_tokens=on_tokens, drop_finished=True)
    if streamer is not None:
        streamer.end()
    return out


def custom_generate(method: str | Method = "sled", **settings):
    """For ``model.generate(..., custom_generate=sled_ext.custom_generate("sled", ...))``:
    transformers prepares inputs, logits processors and stopping criteria (max_new_tokens, eos,
    stop strings...) from its generation config, and this loop uses them."""
    chosen = Method.of(method, **settings)

    def decoding_method(model, input_ids, logits_processor, stopping_criteria,
                        generation_config, streamer=None, **model_kwargs):
        # The mask comes among the model's inputs: naming it here would make transformers pass
        # the caller's mask and the one it prepares, twice.
        attention_mask = model_kwargs.get("attention_mask")
        if generation_config.num_beams != 1:  # transformers would hand a beam search to this loop
            raise ValueError(f"SLED, DoLa and greedy decode one sequence per row: num_beams must "
                             f"be 1, got {generation_config.num_beams}")
        adapter = adapt(model)
        scorer = StepScorer(adapter, chosen)
        pad = generation_config._pad_token_tensor
        out = decode(adapter, scorer, input_ids, attention_mask, logits_processor,
                     stopping_criteria,
                     max_new_tokens=generation_config.max_length - input_ids.shape[1],
                     do_sample=generation_config.do_sample,
                     pad_token_id=int(pad) if pad is not None else 0,
                     on_tokens=streamer.put if streamer is not None else None)
        if streamer is not None:
            streamer.end()
        return out
    return decoding_method
