"""ELBO perplexity and the results summary against closed forms and brute force."""

import json
import math

import pytest
import torch

from qdllm.app.results import quant_summary
from qdllm.atomic import write_json_atomic
from qdllm.eval.ppl import elbo_perplexity, stratified_masks
from qdllm.models import load_dllm


@pytest.fixture(params=["llada", "dream"])
def tiny(request):
    return load_dllm({"name": f"tiny_{request.param}", "family": request.param, "source": "tiny"})


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary(tiny):
    head = (
        tiny.model.get_output_embeddings() if tiny.family != "llada" else tiny.model.model.transformer.ff_out
    )
    torch.nn.init.zeros_(head.weight)
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    out = elbo_perplexity(tiny, windows, mc_num=5, seed=1, batch_size=2)
    assert out["ppl"] == pytest.approx(head.weight.shape[0], rel=1e-5)
    assert out["windows"] == 3


def test_perplexity_is_deterministic_and_matches_a_float64_recomputation(tiny):
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    first = elbo_perplexity(tiny, windows, mc_num=4, seed=7, batch_size=3)
    assert elbo_perplexity(tiny, windows, mc_num=4, seed=7, batch_size=1) == pytest.approx(first, rel=1e-6)
    gen, visible, per_window = torch.Generator().manual_seed(7), int(tiny.shift_logits), []
    for window in windows:
        masks = stratified_masks(24, visible, 4, gen)
        noisy = torch.where(masks, tiny.mask_token_id, window)
        logp = torch.log_softmax(tiny.logits(noisy).double(), dim=-1)
        nll = -logp.gather(-1, window.expand(4, -1)[..., None])[..., 0]
        per_window.append(((nll * masks).sum(1) / masks.sum(1)).mean())
    assert first["nll"] == pytest.approx(torch.stack(per_window).mean().item(), rel=1e-5)


def test_stratified_masks_cover_the_counts_and_never_touch_the_visible_prefix():
    masks = stratified_masks(50, 2, 48, torch.Generator().manual_seed(0))
    counts = masks.sum(1)
    assert not masks[:, :2].any()
    assert counts.min() >= 1 and counts.max() <= 48
    # sample j has k in ((j / n) L', ((j + 1) / n) L']: counts rise with j and cover the range evenly
    bounds = torch.arange(49) / 48 * 48
    assert all(bounds[j] < counts[j] <= math.ceil(bounds[j + 1]) for j in range(48))


def _row(rows, cols, group_size, orders, bits, seconds=1.0):
    return {
        "rows": rows,
        "cols": cols,
        "group_size": group_size,
        "orders": json.dumps(orders),
        "orders_hist": json.dumps({str(k): orders.count(k) for k in sorted(set(orders))}),
        "bits_per_weight": bits,
        "seconds": seconds,
    }


def test_quant_summary_matches_a_brute_force_count_with_ragged_groups():
    layers = [_row(4, 10, 4, [1, 3, 2], 2.5), _row(6, 8, 4, [2, 2], 2.25)]
    # expand every weight's order and bits explicitly
    per_weight = [(1, 2.5)] * (4 * 4) + [(3, 2.5)] * (4 * 4) + [(2, 2.5)] * (4 * 2) + [(2, 2.25)] * (6 * 8)
    n_params = 1000
    out = quant_summary(layers, n_params, "daq")
    assert out["quantized_params"] == len(per_weight) == 88
    assert out["avg_order_or_bits"] == pytest.approx(sum(k for k, _ in per_weight) / 88)
    assert out["bits_per_weight"] == pytest.approx(sum(b for _, b in per_weight) / 88)
    total_bits = sum(b for _, b in per_weight) + (n_params - 88) * 16
    assert out["model_size_gb"] == pytest.approx(total_bits / 8 / 1e9)
    assert out["orders_hist"] == {"1": 1, "2": 3, "3": 1} and out["seconds"] == 2.0
    assert quant_summary([], n_params, "none")["model_size_gb"] == pytest.approx(n_params * 2 / 1e9)


def test_results_are_standard_json_written_in_one_step(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": torch.tensor([1, 2])})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
