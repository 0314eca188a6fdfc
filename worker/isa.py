"""What the CPU can do, read from /proc/cpuinfo, and which kernel paths that makes fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuIsa:
    amx: bool
    avx512_fp16: bool
    avx512_bf16: bool
    avx512_vnni: bool
    avx512: bool
    avx2: bool
    # AVX512 BW+VL+DQ (or AVX-NE-CONVERT): what oneDNN needs to prepack bf16 weights.
    onednn_bf16: bool = False

    @classmethod
    def from_flags(cls, flags: set[str]) -> CpuIsa:
        return cls(
            amx={"amx_tile", "amx_int8", "amx_bf16"} <= flags,
            avx512_fp16="avx512_fp16" in flags,
            avx512_bf16="avx512_bf16" in flags,
            avx512_vnni="avx512_vnni" in flags,
            avx512="avx512f" in flags,
            avx2="avx2" in flags,
            onednn_bf16={"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags,
        )

    @classmethod
    def detect(cls, cpuinfo: Path = CPUINFO) -> CpuIsa:
        return cls.from_flags(cpu_flags(cpuinfo))

    @property
    def ipex_woq_fast(self) -> bool:
        """IPEX compiles its fast weight-only kernels only for CPUs with AMX and AVX512_FP16;
        elsewhere it dequantizes every weight at every step."""
        return self.amx and self.avx512_fp16

    @property
    def ipex_bf16(self) -> bool:
        """IPEX's bf16 recipe prepacks weights with oneDNN, which refuses CPUs without AVX512
        BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only AMD EPYC, for one)."""
        return self.onednn_bf16

    def summary(self) -> str:
        names = ["AMX", "AVX512_FP16", "AVX512_BF16", "AVX512_VNNI", "AVX512", "AVX2"]
        present = [n for n in names if getattr(self, n.lower())]
        return " ".join(present) or "no AVX2"


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The `flags` of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()
