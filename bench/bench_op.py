"""Benchmark of the fused SLED op against the bare projection and the pure-PyTorch reference.

Methods, all on the same inputs in the same run (rate 2.0, lower bound -1000):

  fused       sled_ext.evolve(hidden, weight, None, evolution_scale=k)
  gemm        hidden.reshape(R*N, H) @ weight.T in the input dtype: the floor of any method that
              needs every row's logits (CPU mode)
  unfused     sled_ext.evolve_logits(gemm(...)): torch's GEMM in the input dtype, then the op's
              logits form on its [R, N, V] output (CPU mode)
  final-row   hidden[-1] @ weight.T, one plain vocab-head matmul of the final rows, W read once:
              what decoding without SLED costs (CUDA mode, instead of gemm)
  reference   sled_ext.reference.evolve(hidden, weight, None, k, 2.0, -1000.0): one vocab-head call
              per layer, float32 arithmetic, explicit [L, k, V] tensors, one position at a time

Inputs follow `sled step`: hidden states are a random walk over the rows (neighbouring layers
agree), weight ~ N(0, 2/sqrt(H)); fixed seeds, generated in place.

Timing: one warm-up call, then --repeats timed calls (--reference-repeats for the slow reference);
the table shows the MEDIAN in ms, the JSON keeps every time. On CUDA each call is synchronised.

Peak extra memory (--memory, on by default; --no-memory skips it):
  CPU   each (method, case) runs in a fresh subprocess: build the inputs, warm the thread pool and
        BLAS on a tiny problem (process start-up, not the op), read ru_maxrss, run the method once
        on the real inputs, read ru_maxrss again; the difference is the peak extra memory. A child
        inherits its parent's peak RSS through exec, so every memory child runs first, while this
        process holds nothing but torch. "slack" in the JSON is how far the setup's own peak lay
        above the RSS at the start of the call (memory the delta cannot see; ~0 when valid).
  CUDA  torch.cuda.max_memory_allocated() over the call minus memory_allocated() before it.
  Both methods' numbers include their [N, V] float32 output (N*V*4 bytes). The memory children
  cost about one extra call of each method per case, the reference's dominating.

The reference is skipped for a case (with a note) when its estimated [L, k, V] float32 tensor set,
the p_l - e_i tensor and cosine_similarity's three temporaries, exceeds --reference-limit-gb.

Defaults:  CPU   shapes llama-3.2-1b, tinyllama, llama-3-8b; N 1 8; k 10 75; float32, bfloat16
                 and float16; 5 repeats, 1 for the reference. About an hour on 2 cores
                 (--no-memory --reference-limit-gb 0: fused, gemm and unfused only, ~15 min).
The header names the CPU, torch's ISA level and what the op runs there (sled_ext.cpu_kernels():
the level of its vector loops and, per dtype, how the vocab head is projected).
           CUDA  llama-3-8b, bfloat16; N 1 8 32; k 10 75; 20 repeats, 3 for the reference.
--quick: tinyllama and k 10 only, 3 repeats (about 1.5 minutes on 2 CPU cores).
Explicit flags override both. Results go to --json, by default
bench/results/bench_op-<device>.json (bench_op-<device>-quick.json with --quick).
Other processes (a compile, a test run) steal cores from the timed calls: before each case the
benchmark waits (up to --max-wait s) until they use under 10% of the CPUs, times the case again
(--retries) if they were busier than that meanwhile, and marks it * if they still were.

    .venv/bin/python bench/bench_op.py --quick
    .venv/bin/python bench/bench_op.py --device cuda --json bench/results/h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import sled_ext
from sled_ext import reference
from sled_ext.cli import DTYPES, SHAPES

RATE, LOWER_BOUND = 2.0, -1000.0
DEFAULTS = {
    "cpu": dict(shapes=["llama-3.2-1b", "tinyllama", "llama-3-8b"], batch=[1, 8], k=[10, 75],
                dtypes=["float32", "bfloat16", "float16"], repeats=5, reference_repeats=1),
    "cuda": dict(shapes=["llama-3-8b"], batch=[1, 8, 32], k=[10, 75], dtypes=["bfloat16"],
                 repeats=20, reference_repeats=3),
}
QUICK = dict(shapes=["tinyllama"], k=[10], repeats=3, reference_repeats=1)
OTHERS_LIMIT = 0.10  # share of all CPUs other processes may use while a case is timed
MIB = 2**20


def fused(hidden, weight, k):
    return sled_ext.evolve(hidden, weight, None, evolution_scale=k, evolution_rate=RATE,
                           evolution_lower_bound=LOWER_BOUND)


def gemm(hidden, weight, k):
    return hidden.reshape(-1, hidden.shape[-1]) @ weight.T


def unfused(hidden, weight, k):
    logits = gemm(hidden, weight, k).view(*hidden.shape[:2], weight.shape[0])
    return sled_ext.evolve_logits(logits, evolution_scale=k, evolution_rate=RATE,
                                  evolution_lower_bound=LOWER_BOUND)


def final_row(hidden, weight, k):
    return hidden[-1] @ weight.T


def slow_reference(hidden, weight, k):
    return reference.evolve(hidden, weight, None, k, RATE, LOWER_BOUND)


METHODS = {"fused": fused, "gemm": gemm, "unfused": unfused, "final-row": final_row,
           "reference": slow_reference}
BASELINE = {"cpu": "gemm", "cuda": "final-row"}
SECOND_BASELINE = {"cpu": "unfused", "cuda": None}


def make_hidden(shape, batch, dtype, device):
    hidden = torch.randn(shape["R"], batch, shape["H"], generator=torch.Generator().manual_seed(0))
    return hidden.cumsum_(0).div_(shape["R"] ** 0.5).to(device, dtype)


def make_weight(shape, dtype, device):
    # In place, in the target dtype: no transient copy to raise the memory children's baseline.
    weight = torch.empty(shape["V"], shape["H"], dtype=dtype)
    weight.normal_(0, 2 / shape["H"] ** 0.5, generator=torch.Generator().manual_seed(1))
    return weight.to(device)


def reference_set_bytes(shape, k):
    """The reference's [L, k, V] float32 tensors alive at once: p_l - e_i, then inside
    cosine_similarity both normalised operands and their product."""
    return 4 * (shape["R"] - 1) * k * shape["V"] * 4


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, repeats, device):
    """Every timed call's ms after one warm-up, and the last output."""
    out = fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        del out  # free the previous output first, as a decoding loop would
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times, out


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def max_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_memory_child(request):
    """Runs in the subprocess: prints {"extra": bytes, "slack": bytes} for one method and case."""
    r = json.loads(request)
    shape, dtype, method = SHAPES[r["shape"]], DTYPES[r["dtype"]], METHODS[r["method"]]
    cpu = torch.device("cpu")
    hidden = make_hidden(shape, r["batch"], dtype, cpu)
    weight = make_weight(shape, dtype, cpu)
    tiny = dict(R=shape["R"], H=64, V=max(256, 2 * r["k"]))
    method(make_hidden(tiny, r["batch"], dtype, cpu), make_weight(tiny, dtype, cpu), r["k"])
    before, start_rss = max_rss_bytes(), rss_bytes()
    out = method(hidden, weight, r["k"])
    extra = max_rss_bytes() - before
    print(json.dumps(dict(extra=extra, slack=max(0, before - start_rss), out_bytes=out.nbytes)))


def cpu_peak_extra(case, method):
    request = json.dumps(dict(case, method=method))
    done = subprocess.run([sys.executable, __file__, "--measure-memory-child", request],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {method} {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def cuda_peak_extra(fn, device):
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return dict(extra=torch.cuda.max_memory_allocated(device) - before, slack=0)


def cpu_seconds():
    """CPU seconds used so far by the whole machine (steal included) and by this process."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return machine, usage.ru_utime + usage.ru_stime


def others_share(fn):
    """Runs fn; returns the share of all CPUs that other processes used meanwhile."""
    machine, own, start = *cpu_seconds(), time.perf_counter()
    fn()
    machine_after, own_after = cpu_seconds()
    wall = time.perf_counter() - start
    return max(0.0, (machine_after - machine) - (own_after - own)) / (wall * os.cpu_count())


def wait_until_quiet(max_wait_s):
    """Waits while other processes (a compile, a test run) keep the CPUs busy."""
    deadline = time.monotonic() + max_wait_s
    while others_share(lambda: time.sleep(2)) > OTHERS_LIMIT and time.monotonic() < deadline:
        pass


def cpuinfo(field):
    """The first `field` line of /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return None


ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine_info(device):
    info = dict(cpu=cpuinfo("model name") or platform.processor(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                python=platform.python_version(), platform=platform.platform(),
                load_average=os.getloadavg())
    # Which build was measured: the package is rebuilt in place during development.
    info["sled_ext_library"] = sled_ext._C.__file__
    info["sled_ext_library_mtime"] = time.ctime(os.path.getmtime(sled_ext._C.__file__))
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent)
    info["git"] = git.stdout.strip() or None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["sled_cpu_kernels"] = sled_ext.cpu_kernels()
        info["cpu_flags"] = sorted(flag for flag in (cpuinfo("flags") or "").split()
                                   if flag.startswith(("avx", "amx", "fma")))
        # Settings that cap the ISA torch, oneDNN or MKL use below what the flags offer.
        info["isa_caps"] = {name: os.environ[name] for name in ISA_CAPS if name in os.environ}
    return info


def progress(message):
    print(message, file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES)
    parser.add_argument("--batch", nargs="+", type=int, help="positions N")
    parser.add_argument("--k", nargs="+", type=int, help="evolution_scale")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES)
    parser.add_argument("--repeats", type=int, help="timed calls after the warm-up")
    parser.add_argument("--reference-repeats", type=int, help="timed reference calls")
    parser.add_argument("--quick", action="store_true", help="tinyllama and k 10 only, 3 repeats")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure peak extra memory of fused and reference (default: on)")
    parser.add_argument("--reference-limit-gb", type=float, default=12.0,
                        help="skip the reference above this estimated [L, k, V] tensor set")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a case is timed again when other processes were busy")
    parser.add_argument("--max-wait", type=float, default=600,
                        help="seconds to wait for a busy machine to quieten before each case")
    parser.add_argument("--json", type=Path,
                        help="default bench/results/bench_op-<device>[-quick].json")
    parser.add_argument("--measure-memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    defaults = dict(DEFAULTS[device.type], **(QUICK if args.quick else {}))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.json is None:
        name = f"bench_op-{device.type}{'-quick' if args.quick else ''}.json"
        args.json = Path(__file__).resolve().parent / "results" / name
    return args, device


def run_cases(args, device):
    cases = [dict(shape=s, dtype=d, batch=n, k=k)
             for s in args.shapes for d in args.dtypes for n in args.batch for k in args.k]
    limit = args.reference_limit_gb * 1e9
    for case in cases:
        case["reference_skipped"] = reference_set_bytes(SHAPES[case["shape"]], case["k"]) > limit

    if args.memory and device.type == "cpu":  # first: this process is still small (see docstring)
        for i, case in enumerate(cases, 1):
            progress(f"memory [{i}/{len(cases)}] {describe(case)}")
            request = {key: case[key] for key in ("shape", "dtype", "batch", "k")}
            case["memory"] = {m: None if m == "reference" and case["reference_skipped"]
                              else cpu_peak_extra(request, m) for m in ("fused", "reference")}

    baseline = BASELINE[device.type]
    weight_key, weight = None, None
    for i, case in enumerate(cases, 1):
        shape, dtype = SHAPES[case["shape"]], DTYPES[case["dtype"]]
        if weight_key != (case["shape"], case["dtype"]):
            weight = None  # free the previous one before building the next
            weight_key, weight = (case["shape"], case["dtype"]), make_weight(shape, dtype, device)
        hidden = make_hidden(shape, case["batch"], dtype, device)
        second = SECOND_BASELINE[device.type]
        names = ([baseline, "fused"] + ([second] if second else [])
                 + ([] if case["reference_skipped"] else ["reference"]))
        runs = {name: (lambda fn=METHODS[name]: fn(hidden, weight, case["k"])) for name in names}
        progress(f"timing [{i}/{len(cases)}] {describe(case)}")
        outputs = time_case(case, runs, args, device)
        if args.memory and device.type == "cuda":
            case["memory"] = {name: cuda_peak_extra(runs[name], device) if name in runs else None
                              for name in ("fused", "reference")}
        if "reference" in outputs:
            kept, ref_kept = outputs["fused"] > LOWER_BOUND, outputs["reference"] > LOWER_BOUND
            case["same_topk"] = torch.equal(kept, ref_kept)
            case["max_abs_diff"] = (outputs["fused"] - outputs["reference"]).abs().max().item()
        del outputs, runs, hidden
    return cases


def time_case(case, runs, args, device):
    """Times every method into case["ms"]; returns their last outputs. A case during which other
    processes kept the CPUs busy is timed again, once they have quietened."""
    outputs = {}

    def time_all():
        for name, run in runs.items():
            repeats = args.reference_repeats if name == "reference" else args.repeats
            case["ms"][name], outputs[name] = time_ms(run, repeats, device)

    for attempt in range(1 + args.retries):
        wait_until_quiet(args.max_wait)
        case["ms"] = {}
        case["others_cpu_share"] = others_share(time_all)
        if case["others_cpu_share"] <= OTHERS_LIMIT:
            break
        progress(f"  other processes used {case['others_cpu_share']:.0%} of the CPUs; "
                 + ("timing again" if attempt < args.retries else "keeping it, marked *"))
    return outputs


def describe(case):
    return f"{case['shape']} N={case['batch']} k={case['k']} {case['dtype']}"


def fmt(value, spec, scale=1.0, suffix=""):
    return "-" if value is None else format(value * scale, spec) + suffix


def print_table(cases, baseline, second):
    median = lambda case, name: statistics.median(case["ms"][name]) if name in case["ms"] else None
    ratio = lambda a, b: None if a is None or b is None or b == 0 else a / b
    second_columns = f"{second + ' ms':>11} {'fused/' + second:>14} " if second else ""
    header = (f"{'shape':<14} {'N':>3} {'k':>3} {'dtype':<8} {baseline + ' ms':>12} "
              f"{'fused ms':>10} {'fused/' + baseline:>12} {second_columns}"
              f"{'reference ms':>12} {'reference/fused':>15} {'fused MiB':>10} {'ref MiB':>9} "
              f"{'fused/ref mem':>13}")
    print(header)
    print("-" * len(header))
    for case in cases:
        base, fused_ms, ref_ms = (median(case, n) for n in (baseline, "fused", "reference"))
        second_ms = median(case, second) if second else None
        second_cells = (f"{fmt(second_ms, '.2f'):>11} {fmt(ratio(fused_ms, second_ms), '.2f'):>14} "
                        if second else "")
        memory = case.get("memory") or {}
        fused_mem, ref_mem = ((memory.get(m) or {}).get("extra") for m in ("fused", "reference"))
        shape = case["shape"] + ("*" if case["others_cpu_share"] > OTHERS_LIMIT else "")
        ref_ms = "skipped" if case["reference_skipped"] else fmt(ref_ms, ".1f")
        print(f"{shape:<14} {case['batch']:>3} {case['k']:>3} {case['dtype']:<8} "
              f"{fmt(base, '.2f'):>12} {fmt(fused_ms, '.2f'):>10} "
              f"{fmt(ratio(fused_ms, base), '.2f'):>12} {second_cells}{ref_ms:>12} "
              f"{fmt(ratio(median(case, 'reference'), fused_ms), '.1f'):>15} "
              f"{fmt(fused_mem, '.2f', 1 / MIB):>10} {fmt(ref_mem, '.1f', 1 / MIB):>9} "
              f"{fmt(ratio(fused_mem, ref_mem), '.3f', 100, '%'):>13}")


def print_notes(cases, args):
    print(f"\nTimes: median of {args.repeats} calls ({args.reference_repeats} for the reference) "
          "after one warm-up."
          + (" Memory: peak extra over the inputs, both including the [N, V] float32 output."
             if args.memory else ""))
    for case in cases:
        if case["reference_skipped"]:
            gb = reference_set_bytes(SHAPES[case["shape"]], case["k"]) / 1e9
            print(f"reference skipped for {describe(case)}: its [L, k, V] tensors need ~{gb:.1f} GB"
                  f" > --reference-limit-gb {args.reference_limit_gb}")
        if case.get("same_topk") is False:
            print(f"warning: {describe(case)}: fused and reference keep different top-k sets")
        for method, memory in (case.get("memory") or {}).items():
            if memory and memory["slack"] > 0.1 * max(memory["extra"], MIB):
                print(f"warning: {describe(case)} {method}: memory setup peak lay "
                      f"{memory['slack'] / MIB:.1f} MiB above the start, the delta may be low")
        if case["others_cpu_share"] > OTHERS_LIMIT:
            print(f"* {describe(case)}: other processes used {case['others_cpu_share']:.0%} of the "
                  "CPUs while it was timed")


def main(argv=None):
    args, device = parse_args(argv)
    if args.measure_memory_child:
        return measure_memory_child(args.measure_memory_child)
    machine = machine_info(device)
    print(f"sled_ext.evolve benchmark on {device}: {machine['cpu']}, {machine['torch_threads']} "
          f"torch threads, {machine['cpu_capability']}, torch {machine['torch']}"
          + (f", {machine['gpu']}" if "gpu" in machine else ""))
    if "sled_cpu_kernels" in machine:
        kernels = machine["sled_cpu_kernels"]
        caps = " ".join(f"{name}={value}" for name, value in machine["isa_caps"].items())
        print(f"CPU flags: {' '.join(machine['cpu_flags'])}"
              + (f"\nISA capped (emulating a smaller CPU on this one): {caps}" if caps else "")
              + f"\nsled CPU kernels: {kernels['level']} "
              "vector loops; projection " + ", ".join(
                  f"{dtype} {how}" for dtype, how in kernels.items() if dtype != "level"))
    with torch.inference_mode():
        cases = run_cases(args, device)
    print_table(cases, BASELINE[device.type], SECOND_BASELINE[device.type])
    print_notes(cases, args)
    settings = {key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items() if key != "measure_memory_child"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(machine=machine, settings=settings, rate=RATE,
                                         lower_bound=LOWER_BOUND, statistic="median",
                                         baseline=BASELINE[device.type], cases=cases), indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
