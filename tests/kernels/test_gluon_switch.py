"""The Gluon opt-in's switches (gluon_opt_in._switch), read on every call from the environment
without os.environ.get's exceptions: they must say what os.environ says after every change,
including a replaced os.environ."""
import os
from unittest import mock

import pytest

from stm_kernels.backends.triton import gluon_opt_in

ENVS = [gluon_opt_in.WARP_SPECIALIZED_ENV, gluon_opt_in.WARP_SPECIALIZED_BACKWARD_ENV]


@pytest.mark.parametrize("env", ENVS)
def test_the_switch_follows_the_environment(monkeypatch, env):
    switch = (gluon_opt_in.forward_switch if env == gluon_opt_in.WARP_SPECIALIZED_ENV
              else gluon_opt_in.backward_switch)
    monkeypatch.delenv(env, raising=False)
    assert switch() is None
    for value, expected in (("1", "1"), ("0", "0"), ("yes", None), ("", None)):
        monkeypatch.setenv(env, value)
        assert switch() == expected
        assert gluon_opt_in._environment_value(env) == os.environ.get(env) == value
    monkeypatch.delenv(env)
    assert switch() is None and gluon_opt_in._environment_value(env) is None


def test_a_block_asks_whatever_the_environment_says(monkeypatch):
    monkeypatch.setenv(gluon_opt_in.WARP_SPECIALIZED_ENV, "0")
    with gluon_opt_in.warp_specialized_forward():
        assert gluon_opt_in.forward_switch() == "1"
    assert gluon_opt_in.forward_switch() == "0"


def test_a_replaced_environment_is_read(monkeypatch):
    """A test or a launcher that replaces os.environ (not only its items) is followed too."""
    monkeypatch.delenv(gluon_opt_in.WARP_SPECIALIZED_ENV, raising=False)
    with mock.patch.object(os, "environ", {gluon_opt_in.WARP_SPECIALIZED_ENV: "1"}):
        assert gluon_opt_in.forward_switch() == "1"
    assert gluon_opt_in.forward_switch() is None
