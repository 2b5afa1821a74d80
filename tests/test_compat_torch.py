"""The PyTorch-style facade beyond the golden fixtures: state_dict, layouts, packed lengths, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from numrnn.compat.torch import nn

T, B, D = 5, 3, 3


class FakeTensor:
    """Just enough of a torch tensor for duck typing (torch is optional and not installed in CI)."""

    def __init__(self, array):
        self._array = np.asarray(array)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self._array


def _gru(**kw):
    module = nn.GRU(D, 4, bidirectional=True, **kw)
    rng = np.random.default_rng(0)
    module.load_state_dict({k: rng.uniform(-0.5, 0.5, v.shape) for k, v in module.state_dict().items()})
    return module


def _x(seed=1):
    return np.random.default_rng(seed).standard_normal((T, B, D)).astype(np.float32)


def test_state_dict_keys_and_shapes_follow_pytorch():
    lstm = nn.LSTM(D, 4, num_layers=2, bidirectional=True, proj_size=2)
    shapes = {k: v.shape for k, v in lstm.state_dict().items()}
    assert list(shapes)[:5] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0"]
    assert shapes["weight_ih_l0"] == (16, D) and shapes["weight_hh_l0"] == (16, 2)
    assert shapes["weight_ih_l1_reverse"] == (16, 4) and shapes["weight_hr_l1_reverse"] == (2, 4)
    assert len(shapes) == 20
    assert set(nn.GRU(D, 4, bias=False).state_dict()) == {"weight_ih_l0", "weight_hh_l0"}
    assert lstm.weight_hr_l0.shape == (2, 4) and not lstm.weight_hr_l0.flags.writeable


def test_load_state_dict_accepts_tensors_and_round_trips():
    module = _gru()
    sd = module.state_dict()
    other = nn.GRU(D, 4, bidirectional=True)
    other.load_state_dict({k: FakeTensor(v) for k, v in sd.items()})
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    out_a, h_a = module(_x())
    out_b, h_b = other(FakeTensor(_x()), FakeTensor(np.zeros((2, B, 4))))
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(h_a, h_b)


def test_load_state_dict_errors_name_the_keys():
    module = nn.LSTM(D, 4)
    sd = module.state_dict()
    with pytest.raises(ValueError, match=r"missing keys: \['bias_hh_l0'\]; unexpected keys: \[\]"):
        module.load_state_dict({k: v for k, v in sd.items() if k != "bias_hh_l0"})
    with pytest.raises(ValueError, match=r"missing keys: \[\]; unexpected keys: \['weight_ih_l1'\]"):
        module.load_state_dict({**sd, "weight_ih_l1": sd["weight_ih_l0"]})
    with pytest.raises(ValueError, match=r"state_dict\['weight_hh_l0'\]: expected shape \(16, 4\); got \(4, 16\)"):
        module.load_state_dict({**sd, "weight_hh_l0": sd["weight_hh_l0"].T})
    with pytest.raises(ValueError, match="NaN"):
        module.load_state_dict({**sd, "bias_ih_l0": np.full(16, np.nan)})
    before = module.state_dict()
    result = module.load_state_dict({"bias_ih_l0": np.ones(16), "extra": 1}, strict=False)
    assert result.missing_keys == [k for k in sd if k != "bias_ih_l0"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(module.bias_ih_l0, np.ones(16))
    np.testing.assert_array_equal(module.weight_ih_l0, before["weight_ih_l0"])


def test_packed_lengths_equal_running_each_truncated_row():
    module, x = _gru(), _x()
    lengths = np.array([5, 2, 1])
    out, h_n = module(x, lengths=FakeTensor(lengths))
    for b, n in enumerate(lengths):
        alone, h_alone = module(x[:n, b: b + 1])
        np.testing.assert_allclose(out[:n, b], alone[:, 0], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(out[n:, b], 0)
        np.testing.assert_allclose(h_n[:, b], h_alone[:, 0], rtol=0, atol=1e-6)


def test_batch_first_and_unbatched_layouts():
    module, x = _gru(), _x()
    out, h_n = module(x)
    bf = _gru(batch_first=True)
    out_bf, h_bf = bf(x.transpose(1, 0, 2))
    np.testing.assert_array_equal(out_bf, out.transpose(1, 0, 2))
    np.testing.assert_array_equal(h_bf, h_n)
    out_1, h_1 = module(x[:, 1], h_n[:, 1])  # unbatched: (T, D) and h_0 (layers * directions, H)
    out_ref, h_ref = module(x[:, 1:2], h_n[:, 1:2])
    assert out_1.shape == (T, 8) and h_1.shape == (2, 4)
    np.testing.assert_array_equal(out_1, out_ref[:, 0])
    np.testing.assert_array_equal(h_1, h_ref[:, 0])


@pytest.mark.parametrize("call, match", [
    (lambda m: m(_x(), lengths=[5, 0, 1]), r"GRU: lengths: every length must lie in \[1, 5\]"),
    (lambda m: m(_x(), lengths=[6, 1, 1]), r"GRU: lengths: every length must lie in \[1, 5\]"),
    (lambda m: m(_x(), lengths=[5, 1]), r"GRU: lengths: expected shape \(batch,\) = \(3,\)"),
    (lambda m: m(_x(), np.zeros((1, B, 4))), r"GRU: hx h_0: expected shape \(2, 3, 4\); got \(1, 3, 4\)"),
    (lambda m: m(_x(), (np.zeros((2, B, 4)),)), "GRU: hx must be one array h_0"),
    (lambda m: m(np.zeros((T, B, 2))), "GRU: input: expected 3 features"),
    (lambda m: m(np.zeros((T, D)), lengths=[1]), "lengths needs a batched 3-D input"),
])
def test_bad_call_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(_gru())


def test_lstm_hx_structure():
    lstm = nn.LSTM(D, 4, proj_size=2)
    with pytest.raises(ValueError, match=r"LSTM: hx must be a tuple \(h_0, c_0\)"):
        lstm(_x(), np.zeros((1, B, 2)))
    with pytest.raises(ValueError, match=r"LSTM: hx c_0: expected shape \(1, 3, 4\); got \(1, 3, 2\)"):
        lstm(_x(), (np.zeros((1, B, 2)), np.zeros((1, B, 2))))


@pytest.mark.parametrize("make, match", [
    (lambda: nn.GRU(D, 4, proj_size=2), "proj_size argument is only supported for LSTM"),
    (lambda: nn.LSTM(D, 4, proj_size=4), "proj_size has to be smaller than hidden_size"),
    (lambda: nn.RNN(D, 4, nonlinearity="gelu"), "nonlinearity must be 'tanh' or 'relu'"),
    (lambda: nn.LSTM(D, 4, dropout=1.5), r"dropout must be a number in \[0, 1\]"),
    (lambda: nn.LSTM(D, 0), "hidden_size must be an integer >= 1"),
    (lambda: nn.LSTM(D, 4, device="cuda"), "device must be None or 'cpu'"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_positional_constructor_arguments_follow_pytorch():
    rnn = nn.RNN(D, 4, 2, "relu", False, True)
    assert (rnn.num_layers, rnn.nonlinearity, rnn.bias, rnn.batch_first) == (2, "relu", False, True)
    lstm = nn.LSTM(D, 4, 1, True, False, 0.0, True, 2)
    assert lstm.bidirectional and lstm.proj_size == 2
    assert repr(lstm) == "LSTM(3, 4, proj_size=2, bidirectional=True)"
