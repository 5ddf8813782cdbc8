"""Float64 tiny models with non-trivial norm gains and biases, for exact equivalence checks."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from qdllm.models import load_dllm
from qdllm.models.llada import LLaDAConfig, LLaDAModelLM
from qdllm.models.registry import wrap_model
from qdllm.models.tokenizer import byte_level_tokenizer

SMOL_SPEC = {
    "name": "smol_dllm",
    "family": "ar_dllm",
    "source": str(Path(__file__).resolve().parents[2] / "assets" / "smol_dllm"),
    "dtype": "float32",
    "device": "cpu",
}
FAMILIES = ["llada", "dream", "ar_dllm"]  # tiny LLaDA (MHA), Dream (Qwen2: q/k/v biases, GQA 4/2), Llama


def _rms_norm_in_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
    eps = self.eps if hasattr(self, "eps") else self.variance_epsilon
    return self.weight * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps))


@contextmanager
def exact_norms():
    """The families' RMSNorms compute in fp32 even for fp64 inputs (a ~1e-7 floor on any fp64
    comparison); within this context they use the same formula in the input's dtype, which makes
    fp64 checks exact to ~1e-15 (fp32 models are unaffected)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    from qdllm.models import llada

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llada.RMSNorm, "forward", _rms_norm_in_input_dtype)
        patch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
        patch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", _rms_norm_in_input_dtype)
        yield


def randomise_gains_and_biases(model: nn.Module, seed: int) -> None:
    """Norm gains 1 + 0.5 N(0, 1) and biases 0.3 N(0, 1): unit gains and zero biases (the tiny
    models' init) would hide a missing norm fold or an unrotated bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif p.dim() == 1:  # every 1-D weight of these models is an RMSNorm gain
                p.copy_(1.0 + 0.5 * noise)


def fp64_tiny(family: str, seed: int = 0):
    dllm = load_dllm({"family": family})
    dllm.model.to(torch.float64)
    randomise_gains_and_biases(dllm.model, seed)
    return dllm


def fp64_tied_llada(seed: int = 0):
    """A tiny LLaDA whose LM head is the embedding (config.weight_tying)."""
    tokenizer = byte_level_tokenizer()
    cfg = LLaDAConfig(
        d_model=64,
        n_heads=4,
        n_kv_heads=4,
        n_layers=2,
        mlp_hidden_size=192,
        vocab_size=len(tokenizer),
        embedding_size=len(tokenizer),
        weight_tying=True,
    )
    torch.manual_seed(seed)
    model = LLaDAModelLM(cfg).to(torch.float64).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    randomise_gains_and_biases(model, seed)
    return wrap_model("llada", model, tokenizer, tokenizer.mask_token_id, "tied_llada")


def token_ids(vocab: int, seed: int, batch: int = 2, length: int = 19) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def linear_names(dllm) -> list[str]:
    """Dotted names of every block Linear (the LM head excluded)."""
    prefix = {id(b): n for n, b in dllm.model.named_modules()}
    return [
        f"{prefix[id(block)]}.{name}"
        for block in dllm.blocks()
        for stage in dllm.stages
        for name in stage.linears
    ]


@torch.no_grad()
def input_absmax(dllm, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of every block Linear's input over one forward on `ids` (fp32)."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    for name in linear_names(dllm):

        def hook(module, args, name=name):
            found[name] = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0).float()

        handles.append(dllm.model.get_submodule(name).register_forward_pre_hook(hook))
    dllm.logits(ids)
    for handle in handles:
        handle.remove()
    return found


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis of all entries (3 for a Gaussian)."""
    x = x.double().flatten()
    centred = x - x.mean()
    return float(centred.pow(4).mean() / centred.pow(2).mean().square())


def max_to_mean(x: torch.Tensor) -> float:
    """max |x| / mean |x| over all entries."""
    return float(x.abs().max() / x.abs().mean())
