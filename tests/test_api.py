"""The 5-line Python API end to end on a tiny model, checked against the lower-level path."""

import pytest
import torch

import qdllm
from qdllm.calib import MCSSpec, mcs_states
from qdllm.data import DataSpec, calibration_windows, load_texts
from qdllm.errors import ConfigError
from qdllm.models import load_dllm
from qdllm.pipeline import PipelineSpec, quantize_model

CALIB = {"nsamples": 4, "seqlen": 64}
QUANT = {"group_size": 8, "abmp_ratio": 0.25}


def logits(dllm, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dllm.logits(tokens)


def test_load_quantize_save_reload(tmp_path):
    dllm = qdllm.load("tiny_llada")
    assert dllm.family == "llada" and dllm.model.config.d_model == 64  # conf/model/tiny_llada.yaml

    result = qdllm.quantize(dllm, method="daq", bits=2, **CALIB, mcs={"timesteps": 2}, **QUANT)

    # the same steps by hand through the lower-level modules give the same weights
    reference = load_dllm({"family": "llada"})
    data = DataSpec(**CALIB)
    windows = calibration_windows(load_texts(data), reference.tokenizer, data)
    states, _ = mcs_states(windows, reference.mask_token_id, MCSSpec(timesteps=2))
    quantize_model(reference, states, {"method": "daq", "bits": 2, **QUANT}, PipelineSpec(progress=False))
    for (name, ours), (_, theirs) in zip(
        dllm.model.state_dict().items(), reference.model.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name

    # 2-bit binary codes plus fp16 row/column scales of 8-column groups, ABMP keeps the average at K = 2
    assert 2.0 < result.bits_per_weight < 2.0 + 2 * 16 / 8 + 1
    assert result.summary["avg_order_or_bits"] == pytest.approx(2.0)
    assert len(result.report.layers) == 2 * 7

    qdllm.save_packed(dllm, result, tmp_path / "packed")
    packed = qdllm.load_quantized(tmp_path / "packed")
    tokens = windows[:2, :32]
    torch.testing.assert_close(logits(packed, tokens), logits(dllm, tokens), rtol=1e-4, atol=1e-4)


def test_mcs_switch_reaches_the_statistics():
    """DAQ's weights depend on S, so masked (MCS) and fully visible calibration must differ."""
    weights = []
    for mcs in (True, False):
        dllm = qdllm.load("tiny_llada")
        qdllm.quantize(dllm, method="daq", bits=2, **CALIB, mcs=mcs, group_size=8)
        weights.append(dllm.model.state_dict())
    queries = [k for k in weights[0] if k.endswith("q_proj.weight")]
    assert queries and any(not torch.equal(weights[0][k], weights[1][k]) for k in queries)


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="family="):
        qdllm.load(str(tmp_path))
    with pytest.raises(ConfigError, match="not a config"):
        qdllm.api.model_config("no_such_model")
    dllm = qdllm.load("tiny_llada")
    with pytest.raises(ConfigError, match="unknown MCSSpec fields"):
        qdllm.quantize(dllm, **CALIB, mcs={"gama": 0.5})
    with pytest.raises(ConfigError, match="calib.nsamples"):
        qdllm.quantize(dllm, nsamples=0)


def test_importing_qdllm_leaves_hydra_out():
    """Inference hosts load packed checkpoints with `import qdllm`: no Hydra or calibration stack."""
    import subprocess
    import sys

    code = "import sys, qdllm; print([m for m in ('hydra', 'omegaconf', 'qdllm.api') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
