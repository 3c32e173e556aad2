"""The ``sled`` command line."""
from __future__ import annotations

import argparse
import sys
import time

import torch

SHAPES = {  # R = candidate premature layers + the final row
    "llama-3.2-1b": dict(R=17, H=2048, V=128256),
    "tinyllama": dict(R=23, H=2048, V=32000),
    "llama-3-8b": dict(R=33, H=4096, V=128256),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _timed(fn, device):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def demo(args) -> int:
    """One SLED step on a realistic synthetic shape: the fused op against the reference."""
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sled", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help=demo.__doc__)
    p.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=1, help="positions N (default 1)")
    p.add_argument("--k", type=int, default=10, help="evolution_scale (default 10)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
