"""MC likelihood estimators vs exact enumeration of every mask; determinism; common random numbers."""

import itertools
import math

import pytest
import torch

from qdllm.eval.likelihood import (
    MCSpec,
    dream_masks,
    llada_masks,
    mc_loglikelihood,
    mc_loglikelihoods,
    sequence,
)
from qdllm.models import load_dllm


def tiny(family: str, seed: int = 0, sharpen: float = 20.0):
    dllm = load_dllm({"family": family, "source": "tiny", "seed": seed})
    with torch.no_grad():  # sharper predictions make CE depend on which tokens are masked
        for p in dllm.model.parameters():
            if p.dim() == 2 and p.shape[0] == len(dllm.tokenizer):
                p.mul_(sharpen)
    return dllm


def masked_ce(dllm, ids, start, subset) -> float:
    """Sum over `subset` (target offsets) of -log p(token) with exactly those targets masked (float64)."""
    noisy = torch.tensor([ids])
    for i in subset:
        noisy[0, start + i] = dllm.mask_token_id
    with torch.no_grad():
        logp = torch.log_softmax(dllm.logits(noisy)[0].double(), -1)
    return -sum(logp[start + i, ids[start + i]].item() for i in subset)


def exact_llada(dllm, context, target) -> float:
    """-E_{k ~ U{1..Lt}} E_{|S| = k}[(Lt / k) sum_S CE]: every subset enumerated."""
    ids, start = sequence(dllm, context, target, "llada")
    n, total = len(target), 0.0
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        total += sum(n / k * masked_ce(dllm, ids, start, s) for s in subsets) / len(subsets) / n
    return -total


def exact_dream(dllm, context, target, eps=1e-3, grid=4000) -> float:
    """-E_{p ~ U[eps, 1]}[(1/p) sum_S p^|S| (1-p)^(Lt-|S|) sum_S CE], midpoint rule in p."""
    ids, start = sequence(dllm, context, target, "dream")
    n = len(target)
    p = eps + (torch.arange(grid, dtype=torch.float64) + 0.5) / grid * (1 - eps)
    total = 0.0
    for k in range(1, n + 1):
        level = (p ** (k - 1) * (1 - p) ** (n - k)).mean().item()
        total += level * sum(masked_ce(dllm, ids, start, s) for s in itertools.combinations(range(n), k))
    return -total


@pytest.mark.parametrize(
    ("family", "estimator", "exact"), [("llada", "llada", exact_llada), ("dream", "dream", exact_dream)]
)
def test_estimator_is_unbiased_against_exact_enumeration(family, estimator, exact):
    dllm = tiny(family)
    context, target = list(b"The cat sat on"), list(b" it")
    truth = exact(dllm, context, target)
    spec = MCSpec(estimator=estimator, mc_num=8, mc_batch=4)
    draws = torch.tensor([mc_loglikelihood(dllm, context, target, spec, seed) for seed in range(300)])
    stderr = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - truth) < 4 * stderr + 1e-6, (draws.mean().item(), truth, stderr)
    assert draws.std().item() > 0  # the check is not vacuous: the estimate does vary with the masks


def test_single_token_llada_estimate_is_exact_with_one_sample():
    dllm = tiny("llada")
    context, target = list(b"Answer:"), list(b"B")
    spec = MCSpec(estimator="llada", mc_num=1, mc_batch=1)
    values = {mc_loglikelihood(dllm, context, target, spec, seed) for seed in range(5)}
    assert len(values) == 1 and values.pop() == pytest.approx(exact_llada(dllm, context, target), rel=1e-5)


def test_llada_counts_are_stratified_and_dream_levels_cover_the_unit_interval():
    masks, weights = llada_masks(10, 8, 8, torch.Generator().manual_seed(0))
    counts = masks.sum(1)
    assert torch.equal(weights, 10 / counts.double())
    assert len(set(counts.tolist())) == 8  # 8 rows of one round: 8 distinct mask counts spread over 1..10
    _, inverse_p = dream_masks(5, 16, 16, 1e-3, torch.Generator().manual_seed(0))
    p = torch.sort(1 / inverse_p).values
    assert (p.diff() - (1 - 1e-3) / 16).abs().max() < 1e-9  # one level in each 1/16 of [eps, 1]


def test_estimates_are_seeded_and_two_models_see_identical_masks(monkeypatch):
    first, second = tiny("llada", seed=0), tiny("llada", seed=1)
    seen = {id(first): [], id(second): []}
    for model in (first, second):
        original = model.logits
        monkeypatch.setattr(
            model,
            "logits",
            lambda ids, *span, m=model, f=original: seen[id(m)].append(ids.clone()) or f(ids, *span),
        )
    spec = MCSpec(estimator="llada", mc_num=6, mc_batch=3)
    context, target = list(b"ab"), list(b"cdef")
    a = mc_loglikelihood(first, context, target, spec, seed=7)
    assert mc_loglikelihood(first, context, target, spec, seed=7) == a
    b = mc_loglikelihood(second, context, target, spec, seed=7)
    assert a != b
    calls = len(seen[id(second)])  # forwards of one estimate (rounds may share a forward)
    assert torch.equal(torch.cat(seen[id(first)][:calls]), torch.cat(seen[id(second)]))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_requests_scored_together_equal_requests_scored_one_by_one(family):
    """Copies of equal-length requests share forwards; the estimates must not change (fp32 CPU)."""
    dllm = tiny(family, sharpen=1.0)
    estimator = "llada" if family == "llada" else "dream"
    rng = torch.Generator().manual_seed(3)
    requests = []
    for index in range(12):  # lengths collide on purpose: 2 context lengths x 3 target lengths
        context = torch.randint(0, 256, (3 + index % 2,), generator=rng).tolist()
        target = torch.randint(0, 256, (1 + index % 3,), generator=rng).tolist()
        requests.append((context, target, 100 + index))
    alone = MCSpec(estimator=estimator, mc_num=8, mc_batch=4, batch_tokens=0)
    together = MCSpec(estimator=estimator, mc_num=8, mc_batch=4, batch_tokens=4096)
    one_by_one = [mc_loglikelihood(dllm, c, t, alone, s) for c, t, s in requests]
    batched = mc_loglikelihoods(dllm, requests, together)
    assert batched == pytest.approx(one_by_one, rel=1e-5, abs=1e-6)
    assert len(set(one_by_one)) == len(requests)  # the requests differ, so a mix-up would show


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_logits_of_a_span_equal_the_slice_of_all_logits(family):
    dllm = tiny(family, sharpen=1.0)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    full = dllm.logits(ids)
    for start, length in [(0, 12), (0, 3), (5, 4), (11, 1)]:
        torch.testing.assert_close(dllm.logits(ids, start, length), full[:, start : start + length])


def test_single_token_llada_requests_take_one_forward_whatever_mc_num(monkeypatch):
    dllm = tiny("llada")
    calls = []
    original = dllm.logits
    monkeypatch.setattr(dllm, "logits", lambda ids, *span: calls.append(ids.shape[0]) or original(ids, *span))
    one = mc_loglikelihood(dllm, list(b"Q:"), list(b"A"), MCSpec(estimator="llada", mc_num=1, mc_batch=1), 0)
    many = mc_loglikelihood(
        dllm, list(b"Q:"), list(b"A"), MCSpec(estimator="llada", mc_num=64, mc_batch=32), 5
    )
    assert one == pytest.approx(many) and calls == [1, 1]


def chain_reference(dllm, context, target) -> float:
    """sum_i log p(y_i | c, y_<i, targets i.. masked): one float64 forward per target position."""
    ids, start = sequence(dllm, context, target, "chain")
    total = 0.0
    for i in range(len(target)):
        noisy = torch.tensor([ids])
        noisy[0, start + i : start + len(target)] = dllm.mask_token_id
        with torch.no_grad():
            logp = torch.log_softmax(dllm.logits(noisy)[0].double(), -1)
        total += logp[start + i, ids[start + i]].item()
    return total


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_chain_estimator_equals_the_left_to_right_chain_rule(family):
    dllm = tiny(family)
    context, target = list(b"The cat sat on"), list(b" the mat")
    truth = chain_reference(dllm, context, target)
    estimates = {
        mc_loglikelihood(dllm, context, target, MCSpec(estimator="chain", mc_num=m, mc_batch=3), seed)
        for m, seed in [(1, 0), (32, 1), (128, 2)]
    }
    assert len(estimates) == 1  # deterministic: no masks are drawn, mc_num is not used
    assert estimates.pop() == pytest.approx(truth, rel=1e-5)
    # the chain is not the ELBO: a weight-free or all-masked variant would give another number
    elbo = mc_loglikelihood(dllm, context, target, MCSpec(estimator="dream", mc_num=64, mc_batch=8), 0)
    assert abs(elbo - truth) > 1e-3


def test_chain_estimates_of_a_batch_equal_one_by_one():
    dllm = tiny("dream")
    spec = MCSpec(estimator="chain", mc_batch=4, batch_tokens=64)
    requests = [
        (list(b"ab"), list(b"cdef"), 0),
        (list(b"xy"), list(b"zzzz"), 1),
        (list(b"q"), list(b"rs"), 2),
    ]
    batched = mc_loglikelihoods(dllm, requests, spec)
    single = [chain_reference(dllm, c, t) for c, t, _ in requests]
    assert batched == pytest.approx(single, rel=1e-5)
