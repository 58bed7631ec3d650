"""sample() refuses NaN/inf logits instead of answering with token 0 (argmax of NaN) or a NaN draw."""
import numpy as np
import pytest

from libernie.errors import NonFiniteLogitsError
from libernie.sampling import SamplingParams, sample


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_raise(temperature, bad):
    logits = np.linspace(-1, 1, 16)
    logits[5] = bad
    with pytest.raises(NonFiniteLogitsError, match="weights are broken"):
        sample(logits, SamplingParams(temperature=temperature), np.random.default_rng(0))


def test_finite_logits_still_sample():
    logits = np.linspace(-1, 1, 16)
    assert sample(logits, SamplingParams(temperature=0.0)) == 15
    assert np.argmax(np.array([np.nan, 1.0])) == 0  # why the check exists: argmax would answer token 0
