import pytest

from quant_testlib import make_data, make_model


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """One tiny model (Paddle layout, fp32), its HF twin, and packed text (calibration, held-out)."""
    root = tmp_path_factory.mktemp("quant-assets")
    make_model(root / "base", layout="paddle")
    make_model(root / "base-hf", layout="hf")
    make_data(root / "calib", lines=120)
    make_data(root / "heldout", lines=60, source="sentences.txt")
    return root
