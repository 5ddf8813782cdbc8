"""LoRA, the masked-diffusion objective, the corpus reader and adapter save -> merge round trips."""

import ast
import math
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from qdllm.adapt.corpus import gutenberg_books, random_windows
from qdllm.adapt.lora import LoRALinear, attach_lora
from qdllm.adapt.objective import diffusion_loss, masked_positions, sample_noise
from qdllm.adapt.train import _lr_factor, step_loss
from qdllm.errors import ConfigError
from qdllm.models.adapted import adapter_tensors, merge_adapter, read_adapter_tensors, save_adapter
from qdllm.models.lora import merged_weight
from qdllm.models.qwen_llama import QwenLlamaDLLM
from qdllm.models.tokenizer import byte_level_tokenizer
from qdllm.paths import data_root

DATA_ROOT = data_root()
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_lora_linear_equals_its_merged_weight_in_float64():
    base = nn.Linear(12, 7, bias=False).double()
    adapter = LoRALinear(base, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        adapter.lora_b.normal_()
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight = base.weight + 2.0 * adapter.lora_b @ adapter.lora_a  # alpha / rank = 2
    assert torch.allclose(adapter(x), x @ weight.T, atol=1e-12)
    # merged_weight works in fp32 (then W's dtype): equal to the float64 sum within fp32 rounding
    merged = merged_weight(base.weight, adapter.lora_a, adapter.lora_b, 2.0)
    assert merged.dtype == torch.float64
    fp32_rounding = 4 * torch.finfo(torch.float32).eps * weight.abs().max().item()
    assert torch.allclose(merged, weight, rtol=0, atol=fp32_rounding)
    assert not torch.allclose(merged, base.weight, rtol=0, atol=fp32_rounding)  # the update is there


def _imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement of `path`, at any depth (function-level too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_models_never_import_adapt():
    """Layers run one way: qdllm.adapt builds on qdllm.models, so no models module imports adapt."""
    models = Path(__file__).resolve().parents[2] / "src" / "qdllm" / "models"
    back_edges = {
        f"{path.name} -> {name}"
        for path in sorted(models.glob("*.py"))
        for name in _imported_modules(path)
        if name == "qdllm.adapt" or name.startswith("qdllm.adapt.")
    }
    assert back_edges == set()


def test_fresh_adapters_change_nothing_until_trained():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 9))
    before = model(ids).logits
    adapters = attach_lora(model.model.layers, TARGETS, rank=4, alpha=8.0, seed=0)
    assert len(adapters) == 2 * len(TARGETS)
    assert torch.equal(model(ids).logits, before)  # B = 0 at start
    with torch.no_grad():
        for a in adapters.values():
            a.lora_b.normal_(std=0.1)
    assert not torch.allclose(model(ids).logits, before)


def test_noise_levels_and_masks():
    gen = torch.Generator().manual_seed(0)
    mask, t = sample_noise(4000, 50, eps=0.1, generator=gen)
    assert not mask[:, 0].any() and bool(((t > 0.1 - 1e-7) & (t <= 1)).all())
    rate = mask[:, 1:].float().mean(1)
    assert torch.corrcoef(torch.stack([rate, t]))[0, 1] > 0.95  # each row masks at its own level t
    assert abs(mask[:, 1:].float().mean().item() - (0.1 + 0.9 / 2)) < 0.01  # E[t] for t ~ U(eps, 1]


def test_loss_of_a_uniform_predictor_is_the_closed_form():
    """Uniform logits: CE = log V at every masked position, so L = sum_rows m_r log V / t_r / (B (L-1))."""
    gen = torch.Generator().manual_seed(1)
    mask, t = sample_noise(6, 20, eps=1e-3, generator=gen)
    rows, cols = masked_positions(mask)
    vocab = 37
    logits = torch.zeros(len(rows), vocab)
    targets = torch.randint(0, vocab, (len(rows),), generator=gen)
    loss = diffusion_loss(logits, targets, t[rows], 6 * 19)
    expected = sum(mask[r].sum().item() * math.log(vocab) / t[r].item() for r in range(6)) / (6 * 19)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_training_loss_matches_the_evaluation_path_in_float64():
    """step_loss (training: gathered hidden states, head on masked positions only) against
    DiffusionLM.logits (evaluation: full aligned logits) on the same noisy batch."""
    dllm = QwenLlamaDLLM(tiny_llama().double(), byte_level_tokenizer(), mask_token_id=256)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (3, 10), generator=gen)
    mask, t = sample_noise(3, 10, eps=1e-3, generator=gen)
    weight = dllm.model.get_input_embeddings().weight
    loss = step_loss(dllm, weight, ids, mask, t.double())
    logits = dllm.logits(ids.masked_fill(mask, 256))  # position i scores token i
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    expected = ((ce * mask) / t.double()[:, None]).sum() / (3 * 9)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # CE in fp32 by design


def test_learning_rate_schedule():
    factors = [_lr_factor(s, 100, warmup=10, decay_fraction=0.3, floor=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[69] == 1.0
    assert factors[-1] == pytest.approx(0.1 + 0.9 / 30) and all(
        a >= b for a, b in zip(factors[10:], factors[11:])
    )


def test_gutenberg_books_reassemble_the_shard():
    books = list(gutenberg_books(DATA_ROOT, ["valid"]))
    assert len(books) == 6
    assert "\n\n\n".join(books) + "\n" == (DATA_ROOT / "gutenberg" / "valid.txt").read_text(encoding="utf-8")


def test_a_missing_training_shard_names_the_fix(tmp_path):
    (tmp_path / "gutenberg").mkdir()
    (tmp_path / "gutenberg" / "books.tsv").write_text((DATA_ROOT / "gutenberg" / "books.tsv").read_text())
    with pytest.raises(ConfigError, match="train-00.txt.*QDLLM_DATA_ROOT"):
        list(gutenberg_books(tmp_path, ["train-00"]))
    with pytest.raises(ConfigError, match="books.tsv"):
        list(gutenberg_books(tmp_path / "nowhere", ["valid"]))


def test_random_windows_start_with_the_document_token():
    import numpy as np

    tokens = np.arange(1000, dtype=np.uint16)
    windows = random_windows(tokens, 4, 9, doc_token_id=7777, generator=torch.Generator().manual_seed(0))
    assert windows.shape == (4, 9) and bool((windows[:, 0] == 7777).all())
    assert bool((windows[:, 2:] - windows[:, 1:-1] == 1).all())  # consecutive tokens of the stream


def test_saved_adapter_merges_into_the_trained_model(tmp_path):
    """Train-time model (LoRA modules, trained norms, mask row) == base + merged adapter from disk."""
    trained, base = tiny_llama(), tiny_llama()
    adapters = attach_lora(trained.model.layers, TARGETS, rank=4, alpha=8.0, seed=0)
    norms = {n: p for n, p in trained.named_parameters() if n.endswith("norm.weight")}
    mask_vec = torch.randn(32)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_b.normal_(std=0.1)
        for p in norms.values():
            p.mul_(1.5)
        trained.get_input_embeddings().weight[256] = mask_vec
    config = {"lora": {"rank": 4, "alpha": 8.0, "targets": TARGETS}, "mask_token_id": 256}
    tensors = adapter_tensors(
        {k: (a.lora_a, a.lora_b) for k, a in adapters.items()}, norms, mask_vec, torch.float32
    )
    files = save_adapter(tmp_path, tensors, config, byte_level_tokenizer())
    assert files and all(f.stat().st_size < 16 * 2**20 for f in files)
    merge_adapter(base, read_adapter_tensors(tmp_path), config)
    ids = torch.randint(0, 257, (2, 11))
    assert torch.allclose(base(ids).logits, trained(ids).logits, atol=1e-5)


def test_adapter_tensors_the_code_does_not_know_fail_clearly(tmp_path):
    from qdllm.models.adapted import AdapterError

    config = {"lora": {"rank": 4, "alpha": 8.0, "targets": TARGETS}, "mask_token_id": 256}
    tensors = {"mask_embedding": torch.zeros(32), "extra.thing": torch.zeros(3)}
    with pytest.raises(AdapterError, match="not understood"):
        merge_adapter(tiny_llama(), tensors, config)


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def adapt_composer():
    """compose(overrides) -> DictConfig of conf/adapt.yaml (the config of experiments/adapt_dllm.py)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qdllm.config.adapt import register_adapt_configs

    register_adapt_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield lambda *overrides: compose("adapt", overrides=list(overrides))
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("max_step=30", "max_step"),  # a typo of max_steps
        ("optim.warmup=10", "warmup"),  # a typo of optim.warmup_steps
        ("max_steps=abc", "max_steps"),
        ("lora.rank=1.5", "lora.rank"),
        ("bf16=maybe", "bf16"),
    ],
)
def test_adapt_config_rejects_mistyped_keys_and_ill_typed_values(adapt_composer, override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        adapt_composer(override)
    assert key in f"{info.value} {info.value.__cause__}"


def test_adapt_config_takes_valid_overrides(adapt_composer):
    cfg = adapt_composer("max_steps=30", "out_dir=outputs/probe", "lora.targets=[self_attn.q_proj]")
    assert (cfg.max_steps, cfg.out_dir, list(cfg.lora.targets)) == (30, "outputs/probe", ["self_attn.q_proj"])
    assert cfg.optim.warmup_steps == 100 and cfg.prepare_only is False  # the rest from conf/adapt.yaml


@pytest.mark.slow
def test_adapt_cli_helps_and_stops_a_typo_before_any_work(tmp_path):
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
        script = REPO / "experiments" / "adapt_dllm.py"
        return subprocess.run(
            [sys.executable, str(script), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    helped = cli("--help")
    assert helped.returncode == 0 and "max_steps: 3000" in helped.stdout
    typo = cli("max_step=30", "prepare_only=true", f"out_dir={tmp_path / 'out'}")
    assert typo.returncode != 0 and "max_step" in typo.stderr
    assert list(tmp_path.iterdir()) == []  # nothing tokenised, no output folder


def test_adapt_config_is_complete(adapt_composer):
    cfg = adapt_composer()
    assert OmegaConf.missing_keys(cfg) == set()
    in_plus_out = [
        576 + 576,
        576 + 192,
        576 + 192,
        576 + 576,
        576 + 1536,
        576 + 1536,
        1536 + 576,
    ]  # SmolLM2-135M
    assert len(in_plus_out) == len(cfg.lora.targets)
    assert cfg.lora.rank * sum(in_plus_out) * 30 * 2 < 40e6  # LoRA bytes in bf16 under the 40 MB budget
