"""The lm-evaluation-harness model ``sled`` and task definitions over the packaged data.

``sled-lm-eval`` (:mod:`sled_ext.harness_cli`) is lm-eval's own command line with this model
registered: lm-eval 0.4.13 finds models only in its own table or by registration on import, so a
plain ``lm_eval --model sled`` cannot see it. Unless ``--include_path`` is given, it also puts
:data:`TASKS_DIR` on the include path (tasks ``sled_truthfulqa``, ``sled_gsm8k``)::

    sled-lm-eval --model sled --model_args pretrained=smollm2-135m,evolution_scale=75,\\
        evolution_rate=2.5 --tasks sled_truthfulqa --limit 20

From Python, ``import sled_ext.harness`` registers the model; pass
``TaskManager(include_path=TASKS_DIR)`` to ``simple_evaluate`` for the tasks.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from . import tasks
from .cli import DEFAULT_DEVICE, DTYPES
from .decoding import StepScorer, generate
from .method import MULTIPLE_CHOICE, Method
from .scoring import ChoiceScorer

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# The settings of sled_ext.generate and sled_ext.score: a Method's fields but its name.
SETTINGS = tuple(name for name in Method.__dataclass_fields__ if name != "name")
GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p",
                     "repetition_penalty")


def _layers(layers):
    """model_args split on commas, so a layer list comes as ``0;4;8`` (or one int)."""
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, str) and ";" in layers:
        return [int(layer) for layer in layers.split(";")]
    return layers


@register_model("sled")
class SledLM(LM):
    """``pretrained``: a local Hugging Face folder or a short name of ``sled models list``.
    ``method``: "sled", "dola" or "greedy". Settings take sled_ext's names; one left out takes
    the default of :func:`sled_ext.score` for ``loglikelihood`` (T = 10, lower bound -100) and of
    :func:`sled_ext.generate` for ``generate_until`` (T = 1, lower bound -1000).

    ``loglikelihood`` is the log-probability convention (docs/algorithm.md, "Scoring
    conventions") of the shared-forward scorer ``sled eval`` uses, one forward pass per context
    for all its continuations; ``is_greedy`` asks the decoding step itself whether it would pick
    every continuation token, which costs a second projection of the scored positions."""

    def __init__(self, pretrained, method="sled", dtype="float32", device=None, batch_size=1,
                 max_gen_toks=256, max_batch_size=None, **settings):
        super().__init__()
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"sled: unknown model_args {unknown}; settings are "
                             f"{', '.join(SETTINGS)}")
        if dtype not in DTYPES:
            raise ValueError(f"sled: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1) or max_batch_size is not None:
            raise ValueError(f"sled: batch_size must be an integer >= 1 (no 'auto', no "
                             f"max_batch_size), got {batch_size!r}")
        if "layers" in settings:
            settings["layers"] = _layers(settings["layers"])
        self.generation = Method.of(method, **settings)  # checks the name
        scoring = Method.of(method, MULTIPLE_CHOICE, **settings)
        if device is not None and torch.device(device).type == "cuda" \
                and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise; its hf model then
            # runs on the CPU, and so does this one.
            warnings.warn(f"sled: no CUDA GPU is visible; running on the CPU, not {device}")
            device = None
        from .hub import load
        self.model, self.tokenizer = load(pretrained, dtype=DTYPES[dtype],
                                          device=device or DEFAULT_DEVICE)
        self.method, self.batch_size, self.max_gen_toks = method, batch_size, max_gen_toks
        self.scorer = ChoiceScorer(self.model, self.tokenizer, {method: scoring})
        self.step = StepScorer(self.scorer.adapter, scoring)
        # The captured rows (all layers, then the final one) that the method reads.
        self.rows = self.scorer.rows_of[method]

    def loglikelihood(self, requests, disable_tqdm=False):
        """One shared forward per distinct context, for all its continuations."""
        by_context = {}
        for i, request in enumerate(requests):
            context, continuation = request.args
            by_context.setdefault(context, []).append((i, continuation))
        out = [None] * len(requests)
        for context, group in tqdm(by_context.items(), disable=disable_tqdm, desc="sled"):
            for (i, _), result in zip(group, self._score(context, [c for _, c in group])):
                out[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i].args, result)
        return out

    @torch.inference_mode()
    def _score(self, context, continuations):
        """``(log-probability, is_greedy)`` of each continuation after ``context``."""
        rows, targets, owner, source = self.scorer.forward(context, continuations)
        values = self.scorer.values(rows, targets, source)[self.method]["logprob"]
        missed = (self._picks(rows)[source] != targets.to(rows.device)).long().cpu()
        totals = torch.zeros(len(continuations), dtype=torch.float64)
        totals.index_add_(0, owner, values.double().cpu())
        misses = torch.zeros(len(continuations), dtype=torch.long).index_add_(0, owner, missed)
        return [(total, miss == 0) for total, miss in zip(totals.tolist(), misses.tolist())]

    def _picks(self, rows):
        """The token the method's decoding step picks at each scored position (as
        sled_ext.generate's argmax), ``chunk`` positions per projection."""
        rows = rows[self.rows]
        return torch.cat([self.step(part[-1]) if self.method == "greedy"
                          else self.step.scores(part)
                          for part in rows.split(self.scorer.chunk, dim=1)]).argmax(-1)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError(
            "sled: loglikelihood_rolling (perplexity tasks) is not supported: SLED and DoLa score "
            "a continuation after a prompt (docs/algorithm.md, 'Scoring conventions'), and a "
            "rolling window has no prompt")

    def generate_until(self, requests, disable_tqdm=False):
        """Through sled_ext.generate, ``batch_size`` requests of the same generation arguments
        at a time (left-padded; a batch decodes as its rows alone)."""
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        out = []
        batches, batch = [], []
        for request in requests:
            if batch and (len(batch) == self.batch_size or request.args[1] != batch[0].args[1]):
                batches.append(batch)
                batch = []
            batch.append(request)
        batches += [batch] if batch else []
        for batch in tqdm(batches, disable=disable_tqdm, desc="sled"):
            kwargs = self._generation_kwargs(batch[0].args[1])
            until = kwargs.pop("until")
            encoded = tokenizer([r.args[0] for r in batch], return_tensors="pt",
                                padding=True).to(self.model.device)
            ids = generate(self.model, encoded.input_ids, encoded.attention_mask,
                           method=self.generation, stop_strings=until or None,
                           tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id, **kwargs)
            texts = tokenizer.batch_decode(ids[:, encoded.input_ids.shape[1]:],
                                           skip_special_tokens=True)
            for request, text in zip(batch, texts):
                for stop in until:  # the text up to the first stop string, as lm-eval's hf model
                    text = text.split(stop)[0]
                out.append(text)
                self.cache_hook.add_partial("generate_until", request.args, text)
        return out

    def _generation_kwargs(self, gen_kwargs: dict) -> dict:
        """lm-eval's generation arguments as sled_ext.generate's; temperature 0 is greedy."""
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KWARGS))
        if unknown:
            raise ValueError(f"sled: generation arguments {unknown} are not supported; "
                             f"supported: {', '.join(GENERATION_KWARGS)}")
        until = gen_kwargs.get("until") or []
        temperature = gen_kwargs.get("temperature", 1.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        return dict(until=[until] if isinstance(until, str) else list(until),
                    max_new_tokens=gen_kwargs.get("max_gen_toks", self.max_gen_toks),
                    do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                    top_p=gen_kwargs.get("top_p", 1.0),
                    repetition_penalty=gen_kwargs.get("repetition_penalty", 1.0))


# ---------------------------------------------------------------------------------------------
# Task definitions (lm_eval_tasks/*.yaml) over sled_ext.tasks: its data, prompts and metrics.

def _dataset(task: str, data=None) -> dict:
    """``{"test": Dataset}`` of a task's items; ``data`` (through lm-eval's ``--metadata``) is
    a folder laid out as ``sled eval --data`` takes it."""
    items = tasks.load(task, data)
    if tasks.TASKS[task].kind == "choice":
        rows = [dict(id=item.id, prompt=item.prompt, choices=list(item.true + item.false),
                     n_true=len(item.true), best=item.best) for item in items]
    else:
        rows = [dict(id=item.id, prompt=item.prompt, answer=item.answer) for item in items]
    return {"test": datasets.Dataset.from_list(rows)}


def truthfulqa_dataset(data=None, **_):  # lm-eval passes every metadata entry
    return _dataset("truthfulqa", data)


def truthfulqa_results(doc, results):
    """MC1/MC2/MC3 as ``sled eval truthfulqa`` computes them from the choices' scores."""
    scores = [ll for ll, _ in results]
    n_true = doc["n_true"]
    metrics = tasks.truthfulqa_metrics(scores[:n_true], scores[n_true:], doc["best"])
    return {name.lower(): value for name, value in metrics.items()}


def gsm8k_dataset(data=None, **_):
    return _dataset("gsm8k", data)


def gsm8k_results(doc, results):
    return {"accuracy": float(tasks.generation_correct("gsm8k", results[0], doc["answer"])[1])}
