"""Calibration windows and MCS masking statistics."""

import math

import pytest
import torch

from qdllm.calib import MCSSpec, mcs_states, timestep_grid, visibility
from qdllm.data import CalibrationDataError, DataSpec, calibration_windows, load_texts
from qdllm.models.tokenizer import byte_level_tokenizer

MASK = 999


def test_windows_are_seeded_and_too_small_corpus_fails(c4_path):
    tok = byte_level_tokenizer()
    spec = DataSpec(path=c4_path, nsamples=6, seqlen=256, seed=1)
    texts = load_texts(spec)
    a, b = calibration_windows(texts, tok, spec), calibration_windows(texts, tok, spec)
    assert a.shape == (6, 256) and torch.equal(a, b)
    other = calibration_windows(texts, tok, DataSpec(path=c4_path, nsamples=6, seqlen=256, seed=2))
    assert not torch.equal(a, other)
    with pytest.raises(CalibrationDataError, match="corpus too small"):
        calibration_windows(texts[:3], tok, DataSpec(path=c4_path, nsamples=6, seqlen=256))
    with pytest.raises(CalibrationDataError, match="calib.path"):
        load_texts(DataSpec(path="/no/such/file.jsonl"))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_mcs_keeps_prefix_and_matches_visibility(schedule):
    tokens = torch.randint(0, 500, (64, 400), generator=torch.Generator().manual_seed(0))
    spec = MCSSpec(gamma=0.25, timesteps=5, schedule=schedule, seed=3)
    states, taus = mcs_states(tokens, MASK, spec)
    assert states.shape == (64 * 5, 400)
    prefix = 100
    src = tokens.repeat_interleave(5, dim=0)
    assert torch.equal(states[:, :prefix], src[:, :prefix])
    suffix = states[:, prefix:]
    assert torch.equal(suffix[suffix != MASK], src[:, prefix:][suffix != MASK])
    for tau in timestep_grid(spec):
        rows = suffix[taus == tau]
        visible = (rows != MASK).float().mean().item()
        alpha = visibility(tau, schedule)
        n = rows.numel()
        assert abs(visible - alpha) <= 4 * math.sqrt(max(alpha * (1 - alpha), 1e-12) / n) + 1e-9


def test_grid_full_visible_and_disabled():
    assert timestep_grid(MCSSpec(timesteps=4)) == [0.25, 0.5, 0.75, 1.0]
    assert timestep_grid(MCSSpec(timesteps=4, include_full_visible=True))[0] == 0.0
    tokens = torch.arange(40).reshape(2, 20)
    states, taus = mcs_states(tokens, MASK, MCSSpec(enabled=False))
    assert torch.equal(states, tokens) and (taus == 0).all()


def test_stratified_covers_the_same_timesteps_T_times_cheaper():
    tokens = torch.randint(0, 500, (40, 50), generator=torch.Generator().manual_seed(1))
    full_states, full_taus = mcs_states(tokens, MASK, MCSSpec(timesteps=8, mode="full"))
    strat_states, strat_taus = mcs_states(tokens, MASK, MCSSpec(timesteps=8, mode="stratified"))
    assert set(full_taus.tolist()) == set(strat_taus.tolist())
    assert len(full_states) == 8 * len(strat_states)
    assert torch.bincount((strat_taus * 8).round().long()).tolist()[1:] == [5] * 8
