"""AWQ: the alpha and clip searches against brute force in float64, the weight identity
W_hat = Q(W diag(s)) diag(s)^-1, never worse than RTN, packing with the input scale, config errors."""

import json

import pytest
import torch
import torch.nn.functional as F

import qdllm
from qdllm.packing import ModuleFormat, PackedFormatError
from qdllm.packing.linear import pack_result
from qdllm.packing.module import QuantizedLinear
from qdllm.quant import QuantConfigError, QuantInputError, QuantSpec, quantize_weight
from qdllm.quant.awq import alpha_grid, awq_quantize, clip_ratios, search_clip
from qdllm.quant.groups import group_slices
from qdllm.quant.uniform import find_params
from tests.conftest import random_weight

BITS, GROUP = 3, 16


def outlier_inputs(n_tokens: int, n_cols: int, seed: int) -> torch.Tensor:
    """Inputs with log-normal channel magnitudes and a few large channels, as LLM activations have."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(n_cols, generator=gen))
    scales[torch.randperm(n_cols, generator=gen)[:3]] *= 20
    return torch.randn(n_tokens, n_cols, generator=gen) * scales


def awq(w, x, **cfg):
    cfg = {"method": "awq", "bits": BITS, "group_size": GROUP, **cfg}
    return quantize_weight(w, x.T @ x / x.shape[0], cfg, inputs=x, return_state=True)


def reference_scale(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's s written out in float64, rounded to the fp16 it is stored in."""
    s = x.double().abs().mean(0).pow(alpha).clamp_min(1e-4)
    return (s / (s.max() * s.min()).sqrt()).to(torch.float16).double()


def min_max_rtn(w: torch.Tensor, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group min-max grid (the repository's `find_params`) of w, optionally clamped per row."""
    q = torch.empty_like(w)
    for g, cols in enumerate(group_slices(w.shape[1], GROUP)):
        block = w[:, cols]
        if clip is not None:
            bound = block.abs().amax(1, keepdim=True) * clip[:, g : g + 1]
            block = block.clamp(-bound, bound)
        q[:, cols] = find_params(block, BITS, False, torch.float16).fake_quantize(block)
    return q


def output_error64(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X W^T - X W_hat^T||_F^2 / N in float64, straight from the inputs."""
    x = x.double()
    return float(((x @ w.double().T - x @ w_hat.double().T) ** 2).sum() / x.shape[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_search_is_the_brute_force_minimum_of_the_output_error(seed):
    w, x = random_weight(12, 48, seed), outlier_inputs(400, 48, seed + 10)
    result = awq(w, x, awq_alpha_grid=20, awq_clip_max_shrink=0.0)  # no clipping: the alpha search alone
    brute = []
    for alpha in (i / 20 for i in range(20)):
        s = reference_scale(x, alpha).float()
        brute.append(output_error64(x, w, min_max_rtn(w * s) / s))
    brute = torch.tensor(brute, dtype=torch.float64)
    s = result.state["input_scale"].double()
    chosen = output_error64(x, w, result.weight)
    assert chosen == pytest.approx(float(brute.min()), rel=1e-5)
    assert chosen < brute[0]  # the outlier channels make some alpha > 0 strictly better than RTN
    matches = [i for i in range(20) if torch.equal(reference_scale(x, i / 20), s)]
    assert matches and brute[matches[0]] == pytest.approx(float(brute.min()), rel=1e-5)


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_the_chosen_scale_never_does_worse_than_rtn_and_alpha_zero_is_rtn(seed):
    w, x = random_weight(16, 64, seed), outlier_inputs(300, 64, seed)
    s_hessian = x.T @ x / x.shape[0]
    rtn = quantize_weight(w, s_hessian, {"method": "rtn", "bits": BITS, "group_size": GROUP})
    only_zero = awq(w, x, awq_alpha_grid=1, awq_clip_max_shrink=0.0)
    assert torch.equal(only_zero.weight, rtn.weight) and (only_zero.state["input_scale"] == 1).all()
    searched = awq(w, x, awq_clip_max_shrink=0.0)
    assert output_error64(x, w, searched.weight) <= output_error64(x, w, rtn.weight) * (1 + 1e-6)


def test_clip_search_is_the_brute_force_minimum_of_each_groups_partial_output():
    w, x = random_weight(10, 48, 7), outlier_inputs(256, 48, 8)
    hessian = x.T @ x / x.shape[0]
    ratios = clip_ratios(20, 0.5)
    assert torch.allclose(ratios, torch.tensor([1 - i / 20 for i in range(10)], dtype=torch.float64))
    slices = group_slices(48, GROUP)
    chosen = search_clip(w, hessian, GROUP, BITS, False, torch.float16, ratios)
    x64 = x.double()
    for g, cols in enumerate(slices):
        errors = []  # (k, R): sum_n (x_g . (w_g - q_g))^2 / N for every candidate, in float64
        for r in ratios.tolist():
            clip = torch.full((w.shape[0], len(slices)), r)
            delta = (w - min_max_rtn(w, clip))[:, cols].double()
            errors.append(((x64[:, cols] @ delta.T) ** 2).mean(0))
        errors = torch.stack(errors)
        picked = torch.stack(
            [
                errors[torch.isclose(ratios.float(), c).nonzero()[0, 0], row]
                for row, c in enumerate(chosen[:, g])
            ]
        )
        torch.testing.assert_close(picked, errors.min(0).values, rtol=1e-5, atol=1e-12)
        assert (picked <= errors[0] * (1 + 1e-6)).all()  # never worse than no clipping


def test_the_weight_is_the_clipped_grid_of_the_scaled_weight_divided_by_the_scale():
    w, x = random_weight(20, 50, 9), outlier_inputs(200, 50, 10)  # 50 columns: a ragged last group
    hessian = x.T @ x / x.shape[0]
    slices = group_slices(50, GROUP)
    out = awq_quantize(w, x, hessian, GROUP, BITS, False, torch.float16, 20, clip_ratios(20, 0.5))
    s = out.input_scale
    assert torch.equal(s, s.half().float()) and (s > 0).all()  # stored in fp16 exactly
    assert torch.equal(out.scaled_weight, min_max_rtn(w * s, out.clip))
    assert torch.equal(out.weight, out.scaled_weight / s)
    assert set(out.clip.unique().tolist()) <= set(clip_ratios(20, 0.5).float().tolist())
    assert (out.clip < 1).any()  # the search does clip some groups here
    for cols, grid in zip(slices, out.params, strict=True):
        codes = out.scaled_weight[:, cols] / grid.scale[:, None] + grid.zero[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # every value on its row's grid
        assert codes.round().min() >= 0 and codes.round().max() <= 2**BITS - 1
    result = awq(w, x)  # quantize_weight returns the same, with the storage cost
    assert torch.equal(result.weight, out.weight) and torch.equal(result.state["input_scale"], s)
    assert result.orders.tolist() == [BITS] * 4
    # codes, scales and zero points as RTN stores them, plus one fp16 scale per input channel
    rtn_bits = (BITS * 20 * 50 + 4 * (20 * 16 + 20 * BITS) + 4 * 8) / (20 * 50)
    assert result.bits_per_weight == pytest.approx(rtn_bits + 50 * 16 / (20 * 50))


def test_the_alpha_grid_starts_at_zero_and_stays_below_one():
    grid = alpha_grid(20)
    assert grid[0] == 0 and grid[-1] == pytest.approx(0.95) and len(grid) == 20


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("awq_alpha_grid", 0),
        ("awq_clip_grid", 0),
        ("awq_clip_max_shrink", 1.0),
        ("awq_clip_max_shrink", -0.1),
        ("awq_max_rows", 0),
        ("awq_alpha_grid", 2.5),
        ("compensation", "diag"),
    ],
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(QuantConfigError, match=f"quant.{field}="):
        QuantSpec.from_any({"method": "awq", "bits": 4, field: value})


def test_missing_inputs_are_refused():
    w = random_weight(8, 32, 0)
    with pytest.raises(QuantInputError, match="awq.*inputs"):
        quantize_weight(w, torch.eye(32), {"method": "awq", "bits": 4})


def test_the_config_file_sets_the_study_defaults():
    from omegaconf import OmegaConf

    node = OmegaConf.load("conf/quant/awq.yaml")
    assert node.method == "awq" and node.bits == 4 and node.sym is False and node.awq_alpha_grid == 20
    assert node.awq_clip_grid == 20 and node.awq_clip_max_shrink == 0.5


def test_the_packed_module_carries_the_input_scale():
    w, x = random_weight(24, 64, 11), outlier_inputs(128, 64, 12)
    result = awq(w, x)
    spec = QuantSpec.from_any({"method": "awq", "bits": BITS, "group_size": GROUP})
    fmt, tensors = pack_result(result, spec, (24, 64))
    assert fmt.input_scale and fmt.to_json()["input_scale"] is True
    assert ModuleFormat.from_json("m", fmt.to_json()) == fmt
    assert tensors["uq_input_scale"].dtype == torch.float16 and tensors["uq_input_scale"].shape == (64,)
    layer = QuantizedLinear(tensors, fmt, torch.float32)
    assert torch.equal(layer.dequantize(), result.weight)
    xs = torch.randn(3, 64)
    torch.testing.assert_close(layer(xs), F.linear(xs, result.weight))
    fmt.check("m", tensors)
    with pytest.raises(PackedFormatError, match="input_scale=True but the module does not store"):
        fmt.check("m", {k: v for k, v in tensors.items() if k != "uq_input_scale"})
    with pytest.raises(PackedFormatError, match=r"uq_input_scale has shape \(63,\)"):
        fmt.check("m", {**tensors, "uq_input_scale": tensors["uq_input_scale"][:63]})
    with pytest.raises(PackedFormatError, match="input_scale='yes' must be true or false"):
        ModuleFormat.from_json("m", {**fmt.to_json(), "input_scale": "yes"})
    with pytest.raises(PackedFormatError, match="unknown \\['input_scale'\\]"):
        ModuleFormat.from_json(
            "m", {"kind": "bcq", "group_size": 16, "scale_dtype": "float16", "input_scale": True}
        )
    # a format written before input scales existed reads as none
    old = {"kind": "uniform", "group_size": 16, "scale_dtype": "float16", "sym": False}
    assert ModuleFormat.from_json("m", old).input_scale is False
    assert ModuleFormat("uniform", 16, "float16", False).to_json() == old


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_kernels_get_the_input_divided_by_the_scale():
    w, x = random_weight(256, 384, 13), outlier_inputs(512, 384, 14)
    result = awq(w, x, group_size=128)
    spec = QuantSpec.from_any({"method": "awq", "bits": BITS, "group_size": 128})
    fmt, tensors = pack_result(result, spec, (256, 384))
    layer = QuantizedLinear(tensors, fmt, torch.bfloat16).cuda()
    for tokens in (3, 100):  # fused and blocked paths
        xs = outlier_inputs(tokens, 384, tokens).bfloat16()
        exact = xs.double() @ result.weight.double().T
        y = layer(xs.cuda()).double().cpu()
        assert ((y - exact).norm() / exact.norm()) < 1e-2


def test_awq_end_to_end_on_tiny_llada_reloads_to_identical_logits(tmp_path):
    dllm = qdllm.load("tiny_llada")
    result = qdllm.quantize(
        dllm, method="awq", bits=4, nsamples=4, seqlen=64, mcs={"timesteps": 2}, group_size=8
    )
    assert len(result.report.layers) == 2 * 7
    assert all(row["proxy_error"] < 0.05 for row in result.report.layers)  # 4 bits: small output errors
    qdllm.save_packed(dllm, result, tmp_path / "packed")
    qc = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "awq" and all(f["input_scale"] is True for f in qc["modules"].values())
    loaded = qdllm.load_quantized(tmp_path / "packed")
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.logits(tokens), dllm.logits(tokens))
