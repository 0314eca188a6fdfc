"""tierserve's decode-attention kernel (`decode_attention.cpp`), built for this CPU at first use.

A batched decode step at a few hundred cached positions per row is bound by attention's latency,
not by reading the weights: with IPEX's paged kernel (`single_query_cached_kv_attention`)
attention was 41% of an 8-row bf16 step and 50% of a 16-row one on a Zen 4
(docs/benchmarks/batched-step-*). IPEX's kernel reads every key once per query head; this one
reads it once per key/value head and serves the group's query heads from it
(docs/benchmarks/attention-kernels-*).

It is compiled with `torch.utils.cpp_extension` (a C++ compiler and ninja, which the package
depends on) with `-march=native`, so the library is built per machine: its cached file's name
carries a digest of the source, torch's version and this CPU's flags. Each process that finds no
library builds in a directory of its own and moves the result into place, so concurrent workers
never wait on one another's lock, and a build killed halfway leaves nothing behind. Where it
cannot be built the batch uses IPEX's kernel and the worker says why (`load`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tierserve.domain.config import ModelConfig

log = logging.getLogger(__name__)

# One library: the decode-attention ops and the linears, each defined only where the CPU has its
# instructions: weight-only int8 and int4 (`woq_int8.cpp`, `woq_int4.cpp`) and bfloat16
# (`bf16_linear.cpp`) with AVX512_BF16, dynamic int8 (`dynamic_int8.cpp`) with AVX512_VNNI, float32
# (`fp32_linear.cpp`) with AVX-512F; see `linears`.
_SOURCE_NAMES = (
    "decode_attention.cpp",
    "woq_int8.cpp",
    "woq_int4.cpp",
    "dynamic_int8.cpp",
    "bf16_linear.cpp",
    "fp32_linear.cpp",
)
SOURCES = tuple(Path(__file__).with_name(name) for name in _SOURCE_NAMES)
# Included by the sources: part of the digest, not compiled on their own.
HEADERS = (Path(__file__).with_name("tiles.h"),)
LIBRARY_PREFIX = "tierserve_decode_attention_"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
# The dtypes the kernel computes (accumulating in float32); others take IPEX's kernel.
DTYPES = (torch.float32, torch.bfloat16)
# A build takes about 10 s on two cores.
BUILD_TIMEOUT_S = 600

# out, query, keys, values, tables, lengths, scale: see decode_attention.cpp.
DecodeKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None
]


# query, key, value, key_cache, value_cache, slots, tables, lengths, scale -> the attention op's
# output: a decode step's whole attention in one call (`paged_decode` in decode_attention.cpp).
FusedDecode = Callable[..., torch.Tensor]


def fused_for(kernel: DecodeKernel | None) -> FusedDecode | None:
    """The library's whole decode-step op where `kernel` is the library's kernel (`load` gave it),
    else None (IPEX's kernel, or another one a caller put in its place)."""
    if kernel is None or not hasattr(torch.ops.tierserve, "decode_attention"):
        return None
    if kernel is not torch.ops.tierserve.decode_attention:
        return None
    op: FusedDecode = torch.ops.tierserve.paged_decode
    return op


@dataclass(frozen=True)
class Loaded:
    """The kernel, or None and why not."""

    kernel: DecodeKernel | None
    reason: str


_lock = threading.Lock()
_loaded: list[Loaded] = []


def default_dir() -> Path:
    """Where a worker keeps the library unless told otherwise: the default model cache's."""
    return ModelConfig().resolved_cache_dir() / "kernels"


def load(cache_dir: Path) -> Loaded:
    """The kernel, built into `cache_dir` unless a build for this source, torch and CPU is there;
    once per process (torch registers an op namespace once)."""
    with _lock:
        if not _loaded:
            _loaded.append(_load(cache_dir))
        return _loaded[0]


def library_name() -> str:
    """The file name this source, torch and CPU give the library in the kernel cache."""
    return f"{LIBRARY_PREFIX}{_digest()}.so"


def _load(cache_dir: Path) -> Loaded:
    library = cache_dir / library_name()
    try:
        if not library.exists():
            log.info("building tierserve's decode-attention kernel for this CPU into %s", library)
            _build(library)
        torch.ops.load_library(str(library))  # type: ignore[no-untyped-call]
    except Exception as error:  # no compiler, no ninja, a read-only cache: IPEX's kernel serves
        log.warning("tierserve's decode-attention kernel unavailable: %s", error)
        return Loaded(None, f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")
    return Loaded(torch.ops.tierserve.decode_attention, f"built for this CPU ({library.name})")


def _digest() -> str:
    """Of what the library depends on: the sources, the flags, torch and this CPU's instructions."""
    sources = [source.read_bytes() for source in (*SOURCES, *HEADERS)]
    parts = [*sources, " ".join(FLAGS).encode(), torch.__version__.encode(), _cpu_flags()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return b""


def _build(library: Path) -> None:
    """Compile in a child process (`cpp_extension.load` also loads what it built, and this
    process must load only the finished library) and move the result into place."""
    library.parent.mkdir(parents=True, exist_ok=True)
    # ninja comes with the package, in this interpreter's scripts directory, which need not be
    # on PATH when a worker is started by its full path.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    with tempfile.TemporaryDirectory(prefix="build-", dir=library.parent) as build:
        name = library.stem
        script = (
            "import sys\n"
            "from torch.utils import cpp_extension\n"
            "cpp_extension.load(name=sys.argv[1], sources=sys.argv[2].split(','), extra_cflags=sys.argv[4:],"
            " extra_ldflags=['-fopenmp'], build_directory=sys.argv[3], is_python_module=False)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, name, ",".join(map(str, SOURCES)), build, *FLAGS],
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        built = Path(build) / f"{name}.so"
        if done.returncode != 0 or not built.exists():
            raise RuntimeError(f"the build failed: {_first_error(done.stdout + done.stderr)}")
        staged = library.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(built, staged)
        os.replace(staged, library)  # atomic: another process sees no library or a whole one


def _first_error(output: str) -> str:
    """The compiler's first error line (or the output's last line): what an operator needs."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]  # gcc's "file:line:col: error: ..."
    return (errors or lines or ["no output"])[0]
