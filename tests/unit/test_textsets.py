"""Text sets: the bundled ones are present and apart; bad files give a clear error."""

from pathlib import Path

import pytest

from tierserve.domain.config import ConfigError, DataConfig
from tierserve.domain.textsets import calibration_path, eval_path, fingerprint, read_paragraphs


def test_bundled_calibration_and_eval_texts_are_separate() -> None:
    calibration = read_paragraphs(calibration_path(DataConfig()))
    evaluation = read_paragraphs(eval_path(DataConfig()))
    assert len(calibration) >= 16 and len(evaluation) >= 8
    assert not set(calibration) & set(evaluation)
    assert fingerprint(calibration) != fingerprint(evaluation)


def test_paragraphs_are_split_on_blank_lines_and_whitespace_folded(tmp_path: Path) -> None:
    path = tmp_path / "texts.txt"
    path.write_text("first  line\nsame paragraph\n\n\n second\n\n")
    assert read_paragraphs(path) == ["first line same paragraph", "second"]


def test_empty_or_missing_files_are_config_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ConfigError, match="empty"):
        read_paragraphs(empty)
    with pytest.raises(ConfigError, match="cannot read"):
        read_paragraphs(tmp_path / "absent.txt")


def test_configured_paths_override_the_bundled_ones(tmp_path: Path) -> None:
    data = DataConfig(calibration_file=str(tmp_path / "c.txt"), eval_file=str(tmp_path / "e.txt"))
    assert calibration_path(data) == tmp_path / "c.txt" and eval_path(data) == tmp_path / "e.txt"
