import os
import sys

import pytest

import libernie  # noqa: F401  (sets MKL/OMP defaults before any test imports paddle)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORACLE_DIR = os.path.join(ROOT, ".venv-oracle")


@pytest.fixture(scope="session")
def oracle_python():
    """The interpreter of .venv-oracle (transformers on CPU torch), or a skip saying why not."""
    py = os.path.join(ORACLE_DIR, "bin", "python")
    skip = os.path.join(ORACLE_DIR, "SKIP")
    if os.path.exists(skip):
        pytest.skip(f"oracle unavailable: {open(skip).read().strip()}")
    if not os.path.exists(os.path.join(ORACLE_DIR, ".installed")):
        pytest.skip("oracle unavailable: .venv-oracle is not installed; run `make oracle`")
    return py


def pytest_report_header(config):
    return f"libernie oracle: {ORACLE_DIR} ({'present' if os.path.exists(ORACLE_DIR) else 'absent'}); python {sys.version.split()[0]}"
