"""One build for every x86-64 CPU: the row kernels are compiled once per instruction-set level and
picked at load time (ATEN_CPU_CAPABILITY forces a lower level); bf16 goes through oneDNN's brgemm
where the CPU multiplies it natively. Each level runs in a subprocess, as the level is fixed at
load. (`make test` also runs the whole op suite under each lower level.)"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sled_ext

LEVELS = ["DEFAULT", "AVX2", "AVX512"]
BEST = torch.backends.cpu.get_cpu_capability()
RUNNABLE = LEVELS[:LEVELS.index(BEST) + 1] if BEST in LEVELS else ["DEFAULT"]
# The CPU's feature flags as torch reads them ({} where this torch does not say).
FLAGS = torch._C._cpu._get_cpu_capability() if hasattr(torch._C._cpu, "_get_cpu_capability") \
    else {}
HERE = Path(__file__).resolve().parent


def run_python(code, *args, **env):
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, **env}, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def kernels_under(**env):
    return json.loads(run_python("import json, sled_ext; print(json.dumps(sled_ext.cpu_kernels()))",
                                 **env).splitlines()[-1])


FLOAT_PRODUCT = "FMAs as the weight streams, sgemm for many rows"


@pytest.mark.parametrize("level", LEVELS)
def test_the_forced_level_is_the_one_that_runs(level):
    if level not in RUNNABLE:
        pytest.skip(f"this CPU runs at most {BEST}")
    info = kernels_under(ATEN_CPU_CAPABILITY=level.lower())
    assert info["level"] == level
    # the library's fp32 kernel for few rows needs AVX2
    floats = "sgemm" if level == "DEFAULT" else f"{level} {FLOAT_PRODUCT}"
    assert info["float32"] == floats
    if level != "AVX512":  # oneDNN's micro-kernel needs AVX-512; below it bf16 is widened
        assert info["bfloat16"] == info["float16"] == f"widened to float32, {floats}"


def test_the_best_level_is_torchs():
    assert sled_ext.cpu_kernels()["level"] == (BEST if BEST in LEVELS else "DEFAULT")


def functions_with_vector_extensions(library):
    """Demangled names of the library's functions that hold an AVX/AVX-512 instruction: a VEX or
    EVEX mnemonic (v...), a mask-register op (k...) or a ymm/zmm/k register."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(library)],
                             capture_output=True, text=True, check=True).stdout
    found, current = set(), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = header.group(1)
            continue
        fields = line.split("\t")
        if current is None or len(fields) < 2 or not fields[1].split():
            continue
        mnemonic = fields[1].split()[0]
        if mnemonic[0] in "vk" or re.search(r"%(ymm|zmm|k[0-7])\b", line):
            found.add(current)
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_only_the_level_copies_hold_vector_extension_code():
    """Code outside the AVX2/AVX512 copies runs on any x86-64 CPU: no AVX instruction there,
    not even one an inline function brought in from a header."""
    if not re.match(r"x86_64|amd64", os.uname().machine, re.I):
        pytest.skip("x86-64 only")
    wide = functions_with_vector_extensions(sled_ext._C.__file__)
    outside = sorted(f for f in wide if not re.search(r"(^|::)(AVX2|AVX512)::", f))
    assert any("sled::AVX512::" in f for f in wide), "no AVX-512 copy of the row kernels found"
    assert outside == [], f"AVX code outside the level copies: {outside[:10]}"


# Exactness of the brgemm path in both orientations (few rows: the hidden rows are packed; many
# rows: the weight tile is), packed hidden rows too wide for one product (R = 9, N = 16, H = 2000:
# three depth blocks), packed rows that fill at least 3/4 of the vector lanes (their products folded
# a lane per row: R <= 17 finds each lane's final row by a permute, R >= 18 by two broadcasts,
# R = 2 holds 8 positions in a vector; 12 and 31 rows leave idle lanes), odd H (padded depth), a
# strided weight, bias, soft-cap, T = 10, and the two-phase form.
BRGEMM_CHECK = r"""
import json, math, sys, torch, sled_ext
from sled_ext import reference as ref
from tolerance import assert_matches_reference
torch.manual_seed(0)
info = sled_ext.cpu_kernels()
cases = [dict(R=17, N=1, H=256, V=3001), dict(R=9, N=16, H=2000, V=700),
         dict(R=5, N=40, H=64, V=2000), dict(R=17, N=5, H=400, V=1500),
         dict(R=33, N=3, H=480, V=1200), dict(R=2, N=40, H=353, V=900),
         dict(R=31, N=1, H=131, V=999), dict(R=4, N=3, H=70, V=800),
         dict(R=3, N=2, H=33, V=517), dict(R=2, N=7, H=16, V=100),
         dict(R=33, N=1, H=512, V=1000), dict(R=16, N=4, H=256, V=701)]
for c in cases:
    for strided in (False, True):
        R, N, H, V = c["R"], c["N"], c["H"], c["V"]
        dtype = getattr(torch, sys.argv[1])
        hidden = (torch.randn(R, N, H).cumsum(0) / math.sqrt(R)).to(dtype)
        weight = (torch.randn(V, 2 * H) * (2 / math.sqrt(H))).to(dtype)
        weight = weight[:, ::2] if strided else weight[:, :H].contiguous()
        bias = torch.randn(V).to(dtype)
        for T, softcap in ((1, 0.0), (10, 30.0)):
            out = sled_ext.evolve(hidden, weight, bias, evolution_scale=10, iterations=T,
                                  softcap=softcap)
            expected = ref.evolve(hidden.double(), weight.double(), bias.double(), 10, 2.0,
                                  -1000.0, iterations=T, softcap=softcap)
            assert_matches_reference(out, expected, 10, -1000.0)
        parts = sled_ext.partials(hidden, weight, bias, vocab_offset=0, evolution_scale=10)
        tokens, values, delta, _ = sled_ext.combine(*(t.unsqueeze(0) for t in parts[:5]),
                                                    evolution_scale=10)
        full = sled_ext.evolve(hidden, weight, bias, evolution_scale=10, evolution_rate=0.0)
        assert torch.equal(full.gather(1, tokens), values)
print(json.dumps(info))
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("onednn_isa", ["", "AVX512_CORE_BF16"],
                         ids=["best (AMX here when present)", "AVX512_CORE_BF16 (no AMX)"])
def test_reduced_precision_through_brgemm_is_exact(dtype, onednn_isa):
    """The brgemm path, and the library's own kernels where the hidden rows are few (fp16 split
    on AMX, bf16 on AVX512-BF16 dot products), against the float64 reference; capping oneDNN at
    AVX512-BF16 runs the path of CPUs with bf16 dot products but no AMX (AMD Zen 4, Intel Cooper
    Lake)."""
    env = {"ONEDNN_MAX_CPU_ISA": onednn_isa} if onednn_isa else {}
    if "brgemm" not in kernels_under(**env)[dtype]:
        pytest.skip(f"no brgemm for {dtype} on this CPU")
    info = json.loads(run_python(BRGEMM_CHECK, dtype, **env).splitlines()[-1])
    assert "brgemm" in info[dtype]


BF16_DOTS = "AVX512-BF16 dot products as the weight streams, brgemm for many rows"


@pytest.mark.parametrize("onednn_isa", ["", "AVX512_CORE_BF16"],
                         ids=["best (AMX here when present)", "AVX512_CORE_BF16 (no AMX)"])
def test_bf16_takes_brgemm_where_the_cpu_multiplies_it(onednn_isa):
    """Where the CPU has AMX or AVX512-BF16, bf16 must not silently fall back to widening: AMX
    through brgemm; bf16 dot products without AMX through the library's kernel for few hidden
    rows (one that failed its one-time check would fall back to brgemm, and show here)."""
    if BEST != "AVX512" or not (FLAGS.get("amx_bf16") or FLAGS.get("avx512_bf16")):
        pytest.skip("needs AVX-512 with AMX or AVX512-BF16")
    env = {"ONEDNN_MAX_CPU_ISA": onednn_isa} if onednn_isa else {}
    amx = FLAGS.get("amx_bf16") and not onednn_isa
    assert kernels_under(**env)["bfloat16"] == ("brgemm" if amx else BF16_DOTS)


def test_fp16_takes_amx_where_the_cpu_multiplies_bf16_there():
    """AMX-BF16 without AMX-FP16 (Sapphire/Emerald Rapids): fp16 is split into bf16 parts for AMX
    rather than widened to fp32, as the weight streams where the hidden rows are packed (a kernel
    that failed its one-time check would fall back to splitting for brgemm, and show here); with
    AMX-FP16 it goes to brgemm as it is."""
    if BEST != "AVX512" or not FLAGS.get("amx_bf16"):
        pytest.skip("needs AVX-512 with AMX-BF16")
    expected = "brgemm" if FLAGS.get("amx_fp16") else \
        "split into bfloat16 hi + lo: AMX as the weight streams, brgemm for many rows"
    assert sled_ext.cpu_kernels()["float16"] == expected


@pytest.mark.parametrize("positions,H", [(2, 65), (32, 257), (40, 65)],
                         ids=["hidden rows packed", "folded a lane per row", "weight tiles packed"])
def test_every_half_projects_exactly(positions, H):
    """A one-hot hidden row projects the weight's column exactly, in every dtype path: here all
    65536 float16 values (infinities and NaNs too), through both orientations of the product and
    the odd depth's last column (a vector loop's tail). Where fp16 is split into bf16 hi + lo (AMX
    without AMX-FP16), a value hi + lo did not rebuild would show (dropping lo alone is off by up
    to 2^-9), and so would an infinity times a zero part (NaN instead of the infinity)."""
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    V = every.numel()
    weight = (torch.randn(V, H) / 8).half()
    weight[:, 0], weight[:, H - 1] = every, every.flip(0)
    hidden = torch.zeros(2, positions, H, dtype=torch.float16)
    columns = torch.tensor([0, H - 1]).repeat(positions // 2)
    hidden[-1, torch.arange(positions), columns] = 1.0
    hidden[0] = torch.randn(positions, H).half()
    final_rows = sled_ext.partials(hidden, weight, vocab_offset=0, keep_final=True)[5]
    expected = (hidden[-1].double() @ weight.double().t()).float()  # 0 * inf is NaN there too
    assert expected.isinf().any() and expected.isfinite().sum() > 60000
    torch.testing.assert_close(final_rows, expected, rtol=0, atol=0, equal_nan=True)
