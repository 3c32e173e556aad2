"""How far the noise floor (csrc/sled_math.h, README "Exactness") sits from what it separates:
float32 rounding of a batched projection below it, real premature layers above it. Prints, as
spread(d) / largest |logit| (the floor's measure):

1. random LM-like data (a few massive activations) for several H: the same hidden vectors
   projected by F.linear in one batch of 64 vs one at a time, and float32 vs float64;
2. SmolLM2-135M on the first ITEMS TruthfulQA items (every scored position, all 30 premature
   layers, raw and normed): the smallest real layer contrast, and the rounding of its own
   projection (batched vs alone, float32 vs float64).

    .venv/bin/python bench/noise_floor_margins.py [--items 8] [--data ../shared/data]
"""
import argparse
import math

import torch

from sled_ext import Method, tasks
from sled_ext.decoding import StepScorer
from sled_ext.models import adapt
from sled_ext.scoring import continuation_hidden, tokenize_pair
from sled_ext.reference import NOISE_FLOOR

U = 2.0 ** -24


def spread_ratio(difference, size):
    """Per row: (max - min of ``difference``) / ``size``."""
    return (difference.amax(-1) - difference.amin(-1)) / size


def random_data(hidden_sizes=(576, 2048, 4096, 8192, 16384), vocab=4000):
    torch.manual_seed(0)
    for H in hidden_sizes:
        w = torch.randn(vocab, H) / math.sqrt(H)
        x = torch.randn(64, H) * 3
        x[:, :4] *= 50  # massive activations, as raw residual streams have
        batched = torch.nn.functional.linear(x, w)
        alone = torch.cat([torch.nn.functional.linear(x[i:i + 1], w) for i in range(64)])
        exact = x.double() @ w.double().T
        size = exact.abs().amax(-1)
        for name, e in (("batched vs alone", batched.double() - alone.double()),
                        ("float32 vs float64", batched.double() - exact)):
            r = spread_ratio(e, size).max().item()
            print(f"random H={H:6d} {name:18s} rounding {r:.2e} = {r / (U * math.sqrt(H)):.2f}"
                  f" u sqrt(H); floor / rounding = {NOISE_FLOOR / r:.0f}")


def smollm2(items, data):
    from sled_ext.hub import load
    model, tokenizer = load("smollm2-135m")
    chosen = tasks.load("truthfulqa", data)[:items]
    a = adapt(model)
    for norm in (False, True):
        captured = StepScorer(a, Method(layers="all", premature_norm=norm))  # every layer's rows
        contrast, rounding = [], []
        with torch.inference_mode():
            for item in chosen:
                pairs = [tokenize_pair(tokenizer, item.prompt, c) for c in item.true + item.false]
                final, *_ = continuation_hidden(a, captured.layers, pairs, share=True)
                rows = captured.rows(final)
                z = rows.double() @ a.weight.double().T  # [R, positions, V]
                size = torch.maximum(z[:-1].abs().amax(-1), z[-1].abs().amax(-1))
                contrast.append(spread_ratio(z[:-1] - z[-1], size).flatten())
                batched = a.head(rows[-1]).double()
                alone = torch.cat([a.head(rows[-1][u:u + 1]) for u in range(rows.shape[1])])
                final_size = z[-1].abs().amax(-1)
                rounding.append(torch.maximum(spread_ratio(batched - alone.double(), final_size),
                                              spread_ratio(batched - z[-1], final_size)))
        c, r = torch.cat(contrast), torch.cat(rounding)
        print(f"SmolLM2-135M premature_norm={norm}: {c.numel()} (layer, position) pairs; real "
              f"contrast min {c.min():.3g} (1st percentile {c.quantile(0.01):.3g}, median "
              f"{c.median():.3g}) = {c.min() / NOISE_FLOOR:.0f}x the floor; rounding max "
              f"{r.max():.2e} = floor / {NOISE_FLOOR / r.max():.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--data", default=None, help="data folder (default: as sled eval)")
    args = parser.parse_args()
    print(f"noise floor {NOISE_FLOOR:.3g}")
    random_data()
    smollm2(args.items, args.data)


if __name__ == "__main__":
    main()
