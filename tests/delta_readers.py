"""DuckDB with its delta extension loaded from the `duckdb-ext-delta` wheel (never downloaded), for tests."""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

import pytest


def duckdb_delta_extension() -> str | None:
    """The delta extension file shipped by the `duckdb-ext-delta` package for the installed duckdb, if any."""
    if importlib.util.find_spec("duckdb") is None or importlib.util.find_spec("duckdb_ext") is None:
        return None
    import duckdb
    import duckdb_ext  # type: ignore[import-not-found]  # namespace package of duckdb-ext-delta

    for folder in duckdb_ext.__path__:
        found = glob.glob(os.path.join(folder, "extensions", f"v{duckdb.__version__}", "*", "delta.duckdb_extension"))
        if found:
            return found[0]
    return None


def duckdb_connection() -> Any:
    """A DuckDB connection with `delta_scan` available offline."""
    if duckdb_delta_extension() is None:
        # The dev dependencies pin duckdb and duckdb-ext-delta together; the wheel carries the x86-64 Linux build.
        if platform.system() == "Linux" and platform.machine() == "x86_64":
            pytest.fail("duckdb-ext-delta for this duckdb version is not installed (scripts/setup.sh installs it)")
        pytest.skip("duckdb-ext-delta ships the extension for x86-64 Linux only")
    import duckdb
    import duckdb_ext

    config = {
        "extension_directory": os.path.join(list(duckdb_ext.__path__)[0], "extensions"),
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
    }
    connection = duckdb.connect(config=config)
    connection.execute("LOAD delta")
    return connection


def duckdb_scan(table: str | Path, sql: str) -> list[tuple[Any, ...]]:
    """Runs `sql` over the Delta table at `table`, visible as ``t``."""
    connection = duckdb_connection()
    try:
        connection.execute(f"CREATE VIEW t AS SELECT * FROM delta_scan('{table}')")
        return list(connection.execute(sql).fetchall())
    finally:
        connection.close()
