"""HumanEval / MBPP: the official reference solutions pass, wrong ones fail, prompts match lm-eval's."""

from qdllm.eval.code_task import (
    evaluate_humaneval,
    humaneval_program,
    load_humaneval,
    load_mbpp,
    mbpp_program,
    mbpp_prompt,
    passes,
    truncate,
)
from qdllm.eval.sampler import GenSpec
from qdllm.models import load_dllm
from tests.app.conftest import DATA_ROOT


def test_programs_run_isolated_with_a_timeout():
    assert passes("assert 1 + 1 == 2", timeout=10)
    assert not passes("assert 1 + 1 == 3", timeout=10)
    assert not passes("while True: pass", timeout=1)


def test_official_sets_load_with_their_sizes():
    assert len(load_humaneval(DATA_ROOT)) == 164
    test, shots = load_mbpp(DATA_ROOT)
    assert [d["task_id"] for d in test] == list(range(11, 511)) and [s["task_id"] for s in shots] == [2, 3, 4]


def test_reference_solutions_pass_and_wrong_ones_fail():
    for doc in load_humaneval(DATA_ROOT, limit=3):
        assert passes(humaneval_program(doc, doc["canonical_solution"]), timeout=10)
        assert not passes(humaneval_program(doc, "    return None\n"), timeout=10)
    test, _ = load_mbpp(DATA_ROOT, limit=3)
    for doc in test:
        assert passes(mbpp_program(doc, doc["code"]), timeout=10)
        assert not passes(mbpp_program(doc, "pass"), timeout=10)


def test_mbpp_prompt_has_three_solved_examples_then_the_task():
    test, shots = load_mbpp(DATA_ROOT, limit=1)
    prompt = mbpp_prompt(test[0], shots)
    assert prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert prompt.rindex(test[0]["text"]) > prompt.rindex("[DONE]")
    assert truncate("x = 1\n[DONE]\nmore", ("[DONE]",)) == "x = 1\n"


def test_humaneval_runs_end_to_end_on_a_tiny_model():
    dllm = load_dllm({"family": "dream", "source": "tiny"})
    out = evaluate_humaneval(dllm, load_humaneval(DATA_ROOT, limit=2), GenSpec(8, 8, 8), seed=0, timeout=10)
    assert out == {"pass@1": 0.0, "n": 2.0}  # random bytes are not a solution
