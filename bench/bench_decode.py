"""Decoding speed: SLED vs greedy on the same model in the same run, with the floor beside it.

Per model, dtype and batch size B, the same decoding loop (sled_ext.decoding.decode, KV cache)
runs with three step scorers:

  greedy      the model's own vocab head on the final row
  sled        torch.ops.sled.evolve on all candidate rows (layers="all")
  published   the published style: one vocab-head call per layer + the reference math
              (sled_ext.reference, [L, k, V] tensors)

Time per token = (T(1 + n) - T(1)) / n, T(m) the wall time of a generation of m new tokens from a
16-token prompt (prefill and first token cancel). "extra" = sled - greedy per token; "floor" is the
bare projection GEMM of every candidate row against the vocab matrix ([R*B, H] @ [H, V] in the
model's dtype), the least any exact SLED must add on a CPU. Medians of --repeats runs.

Models: a Llama-3.2-1B-like config with random weights (16 layers, H 2048, V 128256, tied
embeddings; float32 and bfloat16) and the two real models (sled models list; float32).

    .venv/bin/python bench/bench_decode.py              # about 20 minutes on 2 cores
    .venv/bin/python bench/bench_decode.py --quick      # the 1B-like model, float32, B=1

--layer-sets also times SLED over cheaper candidate-layer sets (R = layers + 1 rows to project):

    .venv/bin/python bench/bench_decode.py --models smollm2-135m gemma3-270m --batch 1 \
        --layer-sets all stride:2 stride:4 top-half
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from bench_op import machine_info, progress, time_ms, wait_until_quiet
from sled_ext import reference
from sled_ext.decoding import Method, StepScorer, decode
from sled_ext.models import adapt
from transformers.generation import LogitsProcessorList, StoppingCriteriaList

LLAMA_1B_LIKE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     tie_word_embeddings=True)
K, RATE, LOWER_BOUND = 10, 2.0, -1000.0


class PublishedScorer(StepScorer):
    """The published way to score a step: per-layer head calls, [L, k, V] reference math."""

    def __call__(self, final_hidden):
        a = self.adapter
        return reference.evolve(self.rows(final_hidden), a.weight, a.bias, K, RATE, LOWER_BOUND,
                                logit_scale=a.logit_scale, softcap=a.softcap)


def load_model(name, dtype):
    if name == "llama-3.2-1b-like":
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.LlamaConfig(**LLAMA_1B_LIKE)
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    from sled_ext.hub import load
    return load(name, dtype=dtype)[0]


def generation_seconds(adapter, scorer, ids, new_tokens):
    start = time.perf_counter()
    decode(adapter, scorer, ids, None, LogitsProcessorList(), StoppingCriteriaList(),
           max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def per_token_ms(adapter, scorer, ids, new_tokens, repeats):
    generation_seconds(adapter, scorer, ids, 2)  # warm-up
    runs = [(generation_seconds(adapter, scorer, ids, 1 + new_tokens)
             - generation_seconds(adapter, scorer, ids, 1)) / new_tokens for _ in range(repeats)]
    return 1e3 * statistics.median(runs)


def floor_ms(adapter, rows, batch, repeats):
    weight = adapter.weight
    x = torch.randn(rows * batch, weight.shape[1], dtype=weight.dtype)
    times, _ = time_ms(lambda: x @ weight.T, repeats, weight.device)
    return statistics.median(times)


def run_case(name, dtype_name, batch, args):
    dtype = getattr(torch, dtype_name)
    model = load_model(name, dtype)
    adapter = adapt(model)
    vocab = adapter.weight.shape[0]
    ids = torch.randint(3, vocab, (batch, 16), generator=torch.Generator().manual_seed(0))
    sled_method = Method("sled", evolution_rate=RATE, evolution_scale=K,
                         evolution_lower_bound=LOWER_BOUND)
    scorers = {"greedy": StepScorer(adapter, Method("greedy")),
               "sled": StepScorer(adapter, sled_method),
               "published": PublishedScorer(adapter, sled_method)}
    wait_until_quiet(args.max_wait)
    result = dict(model=name, dtype=dtype_name, batch=batch, rows=len(scorers["sled"].layers) + 1)
    with torch.inference_mode():
        for method, scorer in scorers.items():
            tokens = args.published_tokens if method == "published" else args.new_tokens
            progress(f"{name} {dtype_name} B={batch}: {method}")
            result[f"{method}_ms"] = per_token_ms(adapter, scorer, ids, tokens, args.repeats)
        result["floor_ms"] = floor_ms(adapter, result["rows"], batch, args.repeats)
        result["layer_sets"] = {}
        for layers in args.layer_sets:
            if layers == "all":  # that is "sled" above
                continue
            scorer = StepScorer(adapter, replace(sled_method, layers=layers))
            progress(f"{name} {dtype_name} B={batch}: sled layers={layers}")
            result["layer_sets"][layers] = dict(
                rows=len(scorer.layers) + 1,
                sled_ms=per_token_ms(adapter, scorer, ids, args.new_tokens, args.repeats))
    result["extra_ms"] = result["sled_ms"] - result["greedy_ms"]
    return result


def print_table(results):
    """tok/s count the whole batch. The last two columns compare the published style with SLED:
    per token in total, and in what each adds to greedy decoding."""
    print(f"{'model':<20}{'dtype':<10}{'B':>3}{'R':>4}  {'greedy':>8}{'sled':>8}{'published':>10}"
          f"  {'extra':>7}{'floor':>7}{'extra/floor':>12}  {'published/sled':>15}")
    print(f"{'':<37}  {'tok/s':>8}{'tok/s':>8}{'tok/s':>10}  {'ms/tok':>7}{'ms':>7}{'':>12}"
          f"  {'total':>7}{'extra':>8}")
    for r in results:
        rate = lambda ms: 1e3 * r["batch"] / ms  # noqa: E731
        published_extra = r["published_ms"] - r["greedy_ms"]
        print(f"{r['model']:<20}{r['dtype']:<10}{r['batch']:>3}{r['rows']:>4}  "
              f"{rate(r['greedy_ms']):>8.2f}{rate(r['sled_ms']):>8.2f}"
              f"{rate(r['published_ms']):>10.3f}  {r['extra_ms']:>7.1f}{r['floor_ms']:>7.1f}"
              f"{r['extra_ms'] / r['floor_ms']:>12.2f}  {r['published_ms'] / r['sled_ms']:>7.1f}"
              f"{published_extra / r['extra_ms']:>8.1f}")


def print_layer_table(results):
    """SLED's cost per candidate-layer set: tok/s and what SLED adds to greedy per token, also as
    a fraction of what it adds with all layers."""
    print(f"{'model':<20}{'dtype':<10}{'B':>3}  {'layers':<10}{'R':>4}{'sled tok/s':>12}"
          f"{'extra ms/tok':>14}{'extra / all':>13}")
    for r in results:
        rows = {"all": dict(rows=r["rows"], sled_ms=r["sled_ms"]), **r.get("layer_sets", {})}
        for layers, entry in rows.items():
            extra = entry["sled_ms"] - r["greedy_ms"]
            print(f"{r['model']:<20}{r['dtype']:<10}{r['batch']:>3}  {layers:<10}"
                  f"{entry['rows']:>4}{1e3 * r['batch'] / entry['sled_ms']:>12.2f}"
                  f"{extra:>14.1f}{extra / r['extra_ms']:>13.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+",
                   default=["llama-3.2-1b-like", "smollm2-135m", "gemma3-270m"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--published-tokens", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-wait", type=float, default=120.0)
    p.add_argument("--layer-sets", nargs="+", default=["all"],
                   help="candidate-layer sets to time SLED with besides all (e.g. stride:2 "
                   "stride:4 top-half)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=Path("bench/results/bench_decode-cpu.json"))
    p.add_argument("--table", type=Path, help="only print the table of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.table:
        results = json.loads(args.table.read_text())["results"]
        print_table(results)
        if any(r.get("layer_sets") for r in results):
            print_layer_table(results)
        return
    if args.quick:
        args.models, args.dtypes, args.batch, args.repeats = (["llama-3.2-1b-like"], ["float32"],
                                                              [1], 1)
    machine = machine_info(torch.device("cpu"))
    print(f"Decoding speed on {machine['cpu']}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; k={K}, alpha={RATE}, layers=all")
    results = []
    for name in args.models:
        for dtype_name in (args.dtypes if name == "llama-3.2-1b-like" else ["float32"]):
            for batch in args.batch:
                results.append(run_case(name, dtype_name, batch, args))
    print_table(results)
    if args.layer_sets != ["all"]:
        print_layer_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(machine=machine, settings=vars(args) | {
        "json": str(args.json), "k": K, "rate": RATE}, results=results), indent=2))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
