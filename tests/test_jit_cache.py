"""The engine's compiled kernels are cached per digest of their sources (engine/jit_cache.py):
an edit to any file the kernels inline code or constants from selects a fresh folder."""
from __future__ import annotations

import os
import sys

import numba

from wse.engine import jit_cache


def test_sources_cover_what_the_kernels_inline():
    names = {p.name for p in jit_cache.sources()}
    assert {"kernels.py", "accounting.py", "layout.py", "functional.py", "values.py", "isa.py"} <= names


def test_digest_changes_with_any_file(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("X = 1\n")
    b.write_text("Y = 2\n")
    d0 = jit_cache.digest([a, b])
    assert jit_cache.digest([a, b]) == d0
    b.write_text("Y = 3\n")  # a constant the kernels would fold, in a file they do not live in
    assert jit_cache.digest([a, b]) != d0
    b.write_text("Y = 2\n")
    assert jit_cache.digest([a, b]) == d0


def test_configure_names_a_folder_per_digest(tmp_path, monkeypatch):
    """In the user's cache whatever the stage cache's folder ($WSE_CACHE: tests and runs point it
    at fresh folders, which must not make every process compile the kernels afresh)."""
    monkeypatch.delenv(jit_cache.ENV, raising=False)
    monkeypatch.setenv("WSE_CACHE", str(tmp_path))
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)
    folder = jit_cache.configure()
    assert folder == str(jit_cache.root() / jit_cache.digest()[:16]) and not folder.startswith(str(tmp_path))
    assert os.environ[jit_cache.ENV] == folder  # worker processes inherit it
    assert numba.config.CACHE_DIR == folder  # numba was imported already: its config follows


def test_configure_keeps_a_folder_already_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv(jit_cache.ENV, str(tmp_path / "mine"))
    assert jit_cache.configure() is None
    assert os.environ[jit_cache.ENV] == str(tmp_path / "mine")


def test_the_engine_compiles_into_the_configured_folder():
    import wse.engine.kernels  # noqa: F401
    assert "numba" in sys.modules
    assert numba.config.CACHE_DIR and numba.config.CACHE_DIR == os.environ[jit_cache.ENV]
