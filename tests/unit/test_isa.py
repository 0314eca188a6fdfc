"""ISA detection from /proc/cpuinfo text, and which CPUs make IPEX's weight-only kernels fast."""

from pathlib import Path

from tierserve.worker.isa import CpuIsa

SAPPHIRE_RAPIDS = "fpu avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_int8 amx_bf16"
ZEN4 = "fpu avx2 avx512f avx512_vnni avx512_bf16"


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(
        f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    )
    return path


def test_sapphire_rapids_has_fast_ipex_weight_only_kernels(tmp_path: Path) -> None:
    isa = CpuIsa.detect(cpuinfo(tmp_path, SAPPHIRE_RAPIDS))
    assert isa.amx and isa.avx512_fp16 and isa.ipex_woq_fast
    assert isa.summary().startswith("AMX AVX512_FP16")


def test_zen4_lacks_them(tmp_path: Path) -> None:
    isa = CpuIsa.detect(cpuinfo(tmp_path, ZEN4))
    assert (isa.amx, isa.avx512_fp16, isa.avx512_bf16, isa.avx512_vnni) == (False, False, True, True)
    assert not isa.ipex_woq_fast


def test_amx_without_avx512_fp16_is_not_enough() -> None:
    assert not CpuIsa.from_flags({"amx_tile", "amx_int8", "amx_bf16", "avx512f"}).ipex_woq_fast


def test_unreadable_cpuinfo_means_no_features(tmp_path: Path) -> None:
    isa = CpuIsa.detect(tmp_path / "absent")
    assert not any((isa.amx, isa.avx512, isa.avx2))
    assert isa.summary() == "no AVX2"


def test_this_machine_is_readable() -> None:
    assert isinstance(CpuIsa.detect().summary(), str)
