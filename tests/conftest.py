"""Shared fixtures. Nothing here downloads anything: the tiny model is built in code."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One materialized tunefleet/tiny-llama for the whole session (TUNEFLEET_MODEL_CACHE)."""
    from jobs.tiny import tiny_model_dir

    cache = tmp_path_factory.mktemp("models")
    tiny_model_dir(cache)
    os.environ["TUNEFLEET_MODEL_CACHE"] = str(cache)
    return cache
