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


# -- the store contract on both databases ---------------------------------------------------------
# A test that asks for ``store_target`` (directly or through a ``store`` fixture) runs once on a SQLite
# file and once on a real Postgres (one server per session, a fresh database per test). A test that
# also takes ``db_path`` itself opens the SQLite file underneath, so it runs on SQLite only.


def pytest_generate_tests(metafunc):
    if "store_backend" in metafunc.fixturenames:
        code = metafunc.function.__code__
        own = code.co_varnames[: code.co_argcount]
        metafunc.parametrize("store_backend", ["sqlite"] if "db_path" in own else ["sqlite", "postgres"])


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """One embedded Postgres for the session (``benchmarks.postgres``), stopped at its end."""
    from benchmarks.postgres import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    yield server
    server.stop()


@pytest.fixture
def store_target(store_backend, tmp_path, request):
    """Where a test's store lives: a SQLite path, or the URL of a new Postgres database."""
    if store_backend == "postgres":
        return request.getfixturevalue("postgres").database()
    return tmp_path / "home" / "state.db"
