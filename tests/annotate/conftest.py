"""Fixtures shared by the API and browser tests of `stm annotate`."""
import pytest

from stm_model.demo import SMALL_INTERACTIVE_WEIGHTS, load_small_model


@pytest.fixture(scope="session")
def model():
    """The shipped small interactive STM (what `stm annotate` serves by default)."""
    return load_small_model(SMALL_INTERACTIVE_WEIGHTS)

