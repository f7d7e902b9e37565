"""Fixtures shared by every test module."""

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture
def sample_tsv() -> Path:
    """600 real YFCC100M lines in the 25-column layout."""
    return DATA / "yfcc100m_dataset_sample.tsv"


@pytest.fixture
def artifact_root(tmp_path) -> str:
    root = tmp_path / "artifacts"
    root.mkdir()
    return str(root)
