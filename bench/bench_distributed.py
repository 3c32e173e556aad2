"""The two-phase op over vocab shards: bytes exchanged per step and the cost of each phase
against the single-device op, for 1, 2, 4 and 8 shards of one head (one process, one device: the
shards run one after another, as a stand-in for ranks running them at once).

  partials   sled.partials on every shard (sum over shards; a rank's share is about sum / S)
  combine    sled.combine over the S shards' stacked partials (every rank runs it)
  bytes      what one rank contributes to the all-gather, and what every rank receives

    .venv/bin/python bench/bench_distributed.py                 # CPU, about 3 minutes
    .venv/bin/python bench/bench_distributed.py --device cuda   # bf16 on a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import sled_ext
from bench_op import machine_info, make_hidden, make_weight, synchronize, time_ms
from sled_ext.cli import DTYPES, SHAPES
from sled_ext.distributed import partials_bytes


def shard_bounds(vocab, shards):
    """Unequal shards, as a real split would leave them: the first ones a little larger."""
    edges = [round(vocab * (i / shards) ** 0.9) for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def run_case(shape_name, batch, k, shards, dtype, device, repeats):
    shape = SHAPES[shape_name]
    hidden = make_hidden(shape, batch, dtype, device)
    weight = make_weight(shape, dtype, device)
    bounds = shard_bounds(shape["V"], shards)

    def phase1():
        return [sled_ext.partials(hidden, weight[a:b], None, vocab_offset=a, evolution_scale=k)
                for a, b in bounds]

    parts = phase1()
    stacked = [torch.stack([p[i] for p in parts]) for i in range(5)]
    def median_ms(fn):
        return statistics.median(time_ms(fn, repeats, device)[0])

    single_ms = median_ms(lambda: sled_ext.evolve_topk(hidden, weight, None, evolution_scale=k))
    partials_ms = median_ms(phase1)
    combine_ms = median_ms(lambda: sled_ext.combine(*stacked, evolution_scale=k))
    sent = partials_bytes(batch, shape["R"], k)
    return dict(shape=shape_name, batch=batch, k=k, shards=shards, single_ms=single_ms,
                partials_ms=partials_ms, combine_ms=combine_ms, bytes_per_rank=sent,
                bytes_received=sent * shards)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="+", default=None)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--k", nargs="+", type=int, default=[10, 75])
    p.add_argument("--shards", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = args.shapes or (["llama-3-8b"] if cuda else ["llama-3.2-1b"])
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    json_path = args.json or Path(f"bench/results/bench_distributed-{device.type}.json")
    machine = machine_info(device)
    print(f"Two-phase SLED on {machine.get('gpu', machine['cpu'])}, {dtype}; shards run one "
          f"after another on one device")
    print(f"{'shape':<14}{'N':>3}{'k':>4}{'S':>3}  {'single ms':>10}{'partials ms':>12}"
          f"{'combine ms':>11}  {'KiB per rank':>13}{'KiB received':>13}")
    results = []
    for shape in shapes:
        for batch in args.batch:
            for k in args.k:
                for shards in args.shards:
                    r = run_case(shape, batch, k, shards, dtype, device, args.repeats)
                    results.append(r)
                    print(f"{shape:<14}{batch:>3}{k:>4}{shards:>3}  {r['single_ms']:>10.1f}"
                          f"{r['partials_ms']:>12.1f}{r['combine_ms']:>11.2f}  "
                          f"{r['bytes_per_rank'] / 1024:>13.1f}{r['bytes_received'] / 1024:>13.1f}",
                          flush=True)
    synchronize(device)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(dict(machine=machine, settings=vars(args) | {
        "json": str(json_path), "dtype": str(dtype)}, results=results), indent=2))
    print(f"JSON: {json_path}")


if __name__ == "__main__":
    main()
