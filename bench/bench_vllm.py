"""vLLM decoding speed on the CPU: stock vLLM vs vLLM with the sled-ext plugin, in one run.

Three engine configurations on the same random-weight model (a SmolLM2-135M-like Llama: 30 layers,
H 576, V 49152, tied head; float32, eager mode), B = 1 and 8 prompts of 16 tokens decoded greedily:

  stock         vLLM without the plugin (VLLM_PLUGINS=""), plain requests
  plugin        vLLM with the plugin, plain requests (what the plugin costs requests without SLED)
  plugin+sled   the same engine, every request with extra_args={"sled": {}} (k = 10, all layers)

Time per step = (T(1 + n) - T(1)) / n, T(m) the wall time of one generate call of m new tokens
(prefill and first token cancel); medians of --repeats. "extra" = plugin+sled - stock per step;
"floor" is the projection every exact SLED step must add: the GEMM of all stacked rows
([R*B, H] with R = 31, the 30 premature layers and the final row) against the head ([H, V]),
timed in this process before any engine starts, on --floor-threads threads (default 1: what
vLLM's CPU worker computes with on a 2-core machine, where it keeps one core for itself).

    .venv-vllm/bin/python bench/bench_vllm.py            # after make test-vllm; about 5 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench_op import time_ms

CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, head_dim=64,
              max_position_embeddings=2048, tie_word_embeddings=True)
PROMPT_TOKENS = 16


def engine_times(folder, sled, batches, new_tokens, repeats):
    """Per-step seconds of one engine, by batch size (runs in the engine's own process)."""
    from vllm import LLM, SamplingParams
    llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.2, max_model_len=256, seed=0)
    extra = {"sled": {}} if sled else None

    def seconds(batch, tokens):
        prompts = [{"prompt_token_ids": [3 + (7 * i + 11 * j) % 40000 for j in range(
            PROMPT_TOKENS)]} for i in range(batch)]
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                                extra_args=extra)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    out = {}
    for batch in batches:
        seconds(batch, 2)  # warm-up
        out[batch] = statistics.median(
            (seconds(batch, 1 + new_tokens) - seconds(batch, 1)) / new_tokens
            for _ in range(repeats))
    llm.llm_engine.engine_core.shutdown()
    return out


def floor_seconds(rows, batch, repeats, threads):
    weight = torch.randn(CONFIG["vocab_size"], CONFIG["hidden_size"])
    x = torch.randn(rows * batch, CONFIG["hidden_size"])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times, _ = time_ms(lambda: x @ weight.T, repeats, weight.device)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times) / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--floor-threads", type=int, default=1)
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        times = engine_times(args.folder, args.engine == "plugin+sled", args.batch,
                             args.new_tokens, args.repeats)
        print("RESULT " + json.dumps(times))
        return

    import transformers
    rows = CONFIG["num_hidden_layers"] + 1
    floors = {b: floor_seconds(rows, b, 10, args.floor_threads) for b in args.batch}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**CONFIG)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        results = {}
        for engine in ("stock", "plugin", "plugin+sled"):
            env = dict(os.environ, **({"VLLM_PLUGINS": ""} if engine == "stock" else {}))
            print(f"{engine} ...", file=sys.stderr, flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--engine", engine, "--folder", folder,
                 "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                 "--batch", *map(str, args.batch)],
                env=env, capture_output=True, text=True, check=True).stdout
            line = next(line for line in out.splitlines() if line.startswith("RESULT "))
            results[engine] = {int(b): s for b, s in json.loads(line[7:]).items()}
    print(f"load average {os.getloadavg()}; torch {torch.__version__}, "
          f"floor on {args.floor_threads} thread(s); R = {rows}, V = {CONFIG['vocab_size']}")
    print(f"{'B':>3}  {'stock':>8}{'plugin':>8}{'sled':>8}  {'extra':>8}{'floor':>8}"
          f"{'extra/floor':>12}")
    print(f"{'':>3}  {'tok/s':>8}{'tok/s':>8}{'tok/s':>8}  {'ms/step':>8}{'ms':>8}")
    for b in args.batch:
        stock, plugin, sled = (results[e][b] for e in ("stock", "plugin", "plugin+sled"))
        extra = sled - stock
        print(f"{b:>3}  {b / stock:>8.1f}{b / plugin:>8.1f}{b / sled:>8.1f}  "
              f"{1e3 * extra:>8.1f}{1e3 * floors[b]:>8.1f}{extra / floors[b]:>12.1f}")


if __name__ == "__main__":
    main()
