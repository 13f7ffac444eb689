"""Shared fixtures. Importing mondrian first preloads OpenBLAS before mlx is imported."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import mondrian  # noqa: E402,F401


@pytest.fixture(scope="session", autouse=True)
def mondrian_home(tmp_path_factory) -> Path:
    """One model home per test session, so tests never touch the user's cache."""
    home = tmp_path_factory.mktemp("mondrian_home")
    os.environ["MONDRIAN_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def smollm2(mondrian_home):
    """The embedded default, imported from the wheel's GGUF (a few seconds, once)."""
    from mondrian.models.sources import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2):
    from mlx_lm import load

    return load(smollm2.path)


@pytest.fixture(scope="session")
def tiny_llama(mondrian_home):
    from mondrian.models.sources import resolve

    return resolve("tiny:llama")
