import pytest
import torch

from diffpolicy.config import EmaConfig
from diffpolicy.training.ema import EMA, ema_decay


def test_decay_schedule():
    cfg = EmaConfig(inv_gamma=1.0, power=0.75, min_value=0.0, max_value=0.9999)
    assert ema_decay(0, cfg) == 0.0 and ema_decay(1, cfg) == 0.0
    assert ema_decay(11, cfg) == pytest.approx(1 - 11**-0.75)
    assert ema_decay(10**9, cfg) == 0.9999  # clamped to max_value
    assert ema_decay(2, EmaConfig(min_value=0.5)) == 0.5  # clamped to min_value
    assert ema_decay(5, EmaConfig(update_after_step=10)) == 0.0
    values = [ema_decay(s, cfg) for s in range(2, 2000, 50)]
    assert values == sorted(values)


def test_update_averages_parameters_and_copies_buffers():
    model = torch.nn.BatchNorm1d(3)
    ema = EMA(model, EmaConfig())
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    ema.update(model, 11)
    d = ema_decay(11, EmaConfig())
    assert torch.allclose(ema.model.weight, torch.full((3,), d * 1.0 + (1 - d) * 2.0))
    assert torch.equal(ema.model.running_mean, model.running_mean)
    assert not any(p.requires_grad for p in ema.model.parameters())
    state = ema.state_dict()
    other = EMA(torch.nn.BatchNorm1d(3), EmaConfig())
    other.load_state_dict(state)
    assert torch.equal(other.model.weight, ema.model.weight) and other.decay == ema.decay
