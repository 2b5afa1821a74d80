"""The unroll policy's decisions (no kernel is compiled here): False / True / k / "auto" -> spec loop mode."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import numrnn
from codegen.spec import UNROLL_CEILING, UNROLL_STEPS_CEILING
from numrnn.runtime import policy
from numrnn.runtime.policy import AUTO_STATIC_MAX_STEPS, normalize_unroll, resolve_unroll


@pytest.fixture(autouse=True)
def fresh_fallback_log(monkeypatch):
    """Each test sees a process in which auto has not fallen back yet."""
    monkeypatch.setattr(policy, "_fallback_logged", False)


@pytest.mark.parametrize("value, expected", [
    (False, False), (None, False), (True, True), (np.bool_(True), True), (4, 4), (np.int64(3), 3), ("auto", "auto"),
])
def test_normalize_accepts_keras_values_k_and_auto(value, expected):
    result = normalize_unroll("RNN", value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value", ["yes", "AUTO", 0, -2, 2.5, UNROLL_STEPS_CEILING + 1, [4]])
def test_normalize_rejects_other_values(value):
    with pytest.raises(ValueError, match=r"RNN: unroll must be False .* or 'auto'; got"):
        normalize_unroll("RNN", value)


@pytest.mark.parametrize("unroll, steps, expected", [
    (False, 7, (None, 1)),
    (True, 7, (7, 1)),
    (True, UNROLL_CEILING, (UNROLL_CEILING, 1)),
    (1, 50, (None, 1)),
    (4, 50, (None, 4)),
    (4, 2, (None, 4)),  # fewer steps than k: the remainder loop runs them
    ("auto", 1, (1, 1)),
    ("auto", AUTO_STATIC_MAX_STEPS, (AUTO_STATIC_MAX_STEPS, 1)),
    ("auto", AUTO_STATIC_MAX_STEPS + 1, (None, 1)),
    ("auto", 10 * UNROLL_CEILING, (None, 1)),
])
def test_resolve_decisions(unroll, steps, expected):
    assert resolve_unroll("RNN", unroll, steps) == expected


def test_forced_static_unroll_past_the_ceiling_is_a_clear_error():
    with pytest.raises(ValueError, match=rf"unroll=True needs at most {UNROLL_CEILING} time steps .* got 300"):
        resolve_unroll("RNN", True, 300)


def test_auto_falls_back_with_one_log_line(caplog):
    caplog.set_level(logging.INFO, logger="numrnn")
    assert resolve_unroll("RNN", "auto", 400) == (None, 1)
    assert resolve_unroll("RNN", "auto", 50) == (None, 1)
    assert resolve_unroll("RNN", "auto", 4) == (4, 1)
    lines = [r for r in caplog.records if r.name == "numrnn"]
    assert len(lines) == 1
    assert "unroll='auto'" in lines[0].getMessage() and "400" in lines[0].getMessage()
    assert "dynamic loop" in lines[0].getMessage()


def test_auto_below_the_crossover_logs_nothing(caplog):
    caplog.set_level(logging.DEBUG, logger="numrnn")
    resolve_unroll("RNN", "auto", AUTO_STATIC_MAX_STEPS)
    assert not caplog.records


def test_facade_lowers_unroll_through_the_policy():
    layer = numrnn.GRU(3, unroll="auto", return_sequences=True)
    layer.build((1, 5, 2))
    assert layer.spec(5).unroll == 5
    assert layer.spec(AUTO_STATIC_MAX_STEPS + 1).unroll is None
    partial = numrnn.LSTM(3, unroll=6)
    partial.build((1, 5, 2))
    spec = partial.spec(100)
    assert (spec.unroll, spec.unroll_steps) == (None, 6)
    assert spec.kernel_name().endswith("_partial6")
    assert numrnn.SimpleRNN(3, unroll=True).get_config()["unroll"] is True


def test_facade_config_round_trips_every_unroll_value():
    for value in (False, True, 5, "auto"):
        layer = numrnn.GRU(3, unroll=value)
        assert numrnn.GRU.from_config(layer.get_config()).unroll == value
        assert numrnn.Bidirectional(layer).unroll == value


def test_facade_rejects_a_bad_unroll_at_construction():
    with pytest.raises(ValueError, match="GRU: unroll must be"):
        numrnn.GRU(3, unroll="sometimes")


def test_facade_forced_static_unroll_past_the_ceiling():
    layer = numrnn.GRU(3, unroll=True)
    layer.build((1, 5, 2))
    with pytest.raises(ValueError, match=f"GRU: unroll=True needs at most {UNROLL_CEILING}"):
        layer.spec(UNROLL_CEILING + 1)
