"""ABMP: exact budget, score-following allocation, Alg. 3's k, block-scope optimality."""

import itertools
import random

import pytest
import torch

from qdllm.quant.abmp import allocate_orders, group_scores


@pytest.mark.parametrize(
    "n_groups,ratio,k",
    # k = floor(ratio * G) (paper §3.4): LLaDA G = 32 / 96 and Dream G = 28 / 148 at 5, 10, 15 %
    [
        (32, 0.05, 1),
        (32, 0.10, 3),
        (32, 0.15, 4),
        (96, 0.05, 4),
        (96, 0.10, 9),
        (96, 0.15, 14),
        (28, 0.05, 1),
        (28, 0.10, 2),
        (28, 0.15, 4),
        (148, 0.05, 7),
        (148, 0.10, 14),
        (148, 0.15, 22),
        (19, 0.05, 0),
        (10, 0.0, 0),
    ],
)
def test_matrix_scope_moves_floor_ratio_groups(n_groups, ratio, k):
    scores = torch.rand(n_groups, generator=torch.Generator().manual_seed(n_groups))
    (orders,) = allocate_orders([scores], [[4096 * 128] * n_groups], ratio, 2)
    assert int((orders == 3).sum()) == k and int((orders == 1).sum()) == k
    assert int(orders.sum()) == 2 * n_groups
    ranked = torch.argsort(scores, descending=True)
    assert set(ranked[:k].tolist()) == set(torch.nonzero(orders == 3).flatten().tolist())
    assert set(ranked[n_groups - k :].tolist()) == set(torch.nonzero(orders == 1).flatten().tolist())


def _brute_force_best_balance(scores, sizes, budget):
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    best = 0
    for n_up, n_down in itertools.product(range(len(ranked) + 1), repeat=2):
        if n_up + n_down > len(ranked):
            continue
        up = sum(sizes[i] for i in ranked[:n_up])
        down = sum(sizes[i] for i in ranked[len(ranked) - n_down :])
        if up == down and up <= budget:
            best = max(best, up)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_block_scope_keeps_average_exact_and_moves_the_most(seed):
    rng = random.Random(seed)
    row_counts = [rng.choice([4, 12, 8]) for _ in range(3)]
    scores = [
        torch.rand(rng.randint(2, 5), generator=torch.Generator().manual_seed(seed * 7 + m)) for m in range(3)
    ]
    sizes = [[r * 128] * len(s) for r, s in zip(row_counts, scores)]
    ratio = rng.choice([0.05, 0.1, 0.15, 0.3])
    orders = allocate_orders(scores, sizes, ratio, 2)
    flat_o = torch.cat(orders).tolist()
    flat_s = [x for per in sizes for x in per]
    flat_sc = torch.cat(scores).tolist()
    assert sum(o * n for o, n in zip(flat_o, flat_s)) == 2 * sum(flat_s)  # exact budget
    moved_up = sum(n for o, n in zip(flat_o, flat_s) if o == 3)
    total = sum(flat_s)
    assert moved_up == _brute_force_best_balance(flat_sc, flat_s, int(ratio * total + 1e-9))
    top = [s for s, o in zip(flat_sc, flat_o) if o == 3]
    mid = [s for s, o in zip(flat_sc, flat_o) if o == 2]
    low = [s for s, o in zip(flat_sc, flat_o) if o == 1]
    if top and mid:
        assert min(top) >= max(mid)
    if low and mid:
        assert max(low) <= min(mid)


def test_group_scores_sum_and_mean():
    z = torch.arange(2 * 300, dtype=torch.float32).reshape(2, 300)
    sums = group_scores(z, 128)
    assert sums.tolist() == [z[:, :128].sum().item(), z[:, 128:256].sum().item(), z[:, 256:].sum().item()]
    means = group_scores(z, 128, reduce="mean")
    assert means[2].item() == pytest.approx(z[:, 256:].mean().item())
