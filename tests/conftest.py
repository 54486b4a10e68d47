"""Test-session setup: Triton kernels run in Triton's CPU interpreter (no GPU in CI).

Triton reads TRITON_INTERPRET when a kernel is first compiled, which may happen in any test module, so it is set
here, before any test imports triton.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _tuning_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autotune results go to a temporary folder, never the user's ~/.cache (a GPU test run persists them)."""
    if "DIT_SPARSE_TUNING_CACHE" not in os.environ:
        monkeypatch.setenv("DIT_SPARSE_TUNING_CACHE", str(tmp_path_factory.getbasetemp() / "tuning"))
