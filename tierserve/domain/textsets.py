"""The text sets behind calibration and accuracy cards: paragraphs separated by blank lines."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tierserve.domain.config import ConfigError, DataConfig

BUNDLED = Path(__file__).resolve().parent / "data"


def read_paragraphs(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read text set {path}: {error.strerror}") from None
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise ConfigError(f"text set {path} is empty: it needs paragraphs separated by blank lines")
    return paragraphs


def calibration_path(data: DataConfig) -> Path:
    return Path(data.calibration_file).expanduser() if data.calibration_file else BUNDLED / "calibration.txt"


def eval_path(data: DataConfig) -> Path:
    return Path(data.eval_file).expanduser() if data.eval_file else BUNDLED / "eval.txt"


def fingerprint(paragraphs: list[str]) -> str:
    return hashlib.sha256("\n\n".join(paragraphs).encode()).hexdigest()
