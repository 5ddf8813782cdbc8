"""MATH answer extraction and normalisation (hand-checked cases), and a tiny end-to-end run."""

import pytest

from qdllm.eval.math_task import extract_answer, is_correct, last_boxed, load_math_docs, normalize_answer
from qdllm.eval.sampler import GenSpec
from tests.app.conftest import REPO

OLMO_ROOT = REPO / ".data" / "eval"


def test_last_boxed_balances_nested_braces():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{a}{b}} done") == r"\frac{a}{b}"
    assert last_boxed("no box") is None and last_boxed(r"\boxed{open") is None


@pytest.mark.parametrize(
    ("generation", "answer"),
    [
        (r"Final Answer: The final answer is $\frac{3}{4}$. I hope it is correct.", r"$\frac{3}{4}$"),
        (r"We get $x = \boxed{12}$.", "12"),
        ("nothing here", ""),
    ],
)
def test_extract_answer(generation, answer):
    assert extract_answer(generation) == answer


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (r"\dfrac{1}{2}", r"\frac12"),
        (r"$x = 5$", "5"),
        (r"90^\circ", "90"),
        (r"\text{(C)}", "(C)"),
        ("1,000", "1000"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"{7}.", "7"),
    ],
)
def test_equivalent_forms_normalise_to_the_same_string(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize(
    ("a", "b"), [("12", "21"), (r"\frac{1}{2}", r"\frac{2}{1}"), ("(1,2)", "[1,2]"), ("-3", "3")]
)
def test_different_answers_stay_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_is_correct_compares_with_the_reference_box():
    solution = r"The roots are $2$ and $-3$, so there are $\boxed{2}$ asymptotes."
    assert is_correct(r"... so the answer is $\boxed{2}$.", solution)
    assert not is_correct(r"The final answer is 3. I hope it is correct.", solution)


@pytest.mark.skipif(not (OLMO_ROOT / ".complete").exists(), reason="run `make data` first")
def test_math_split_is_complete_and_runs_on_a_tiny_model():
    from qdllm.eval.math_task import evaluate_math
    from qdllm.models import load_dllm

    assert len(load_math_docs(OLMO_ROOT)) == 5000
    docs = load_math_docs(OLMO_ROOT, limit=1)
    assert len(docs) == 7 and all("solution" in d and d["query"].startswith("Problem:") for d in docs)
    dllm = load_dllm({"family": "llada", "source": "tiny"})
    out = evaluate_math(dllm, docs[:2], GenSpec(gen_length=8, steps=8, block_length=8), seed=0)
    assert out == {"exact_match": 0.0, "n": 2.0}  # a random byte model does not solve MATH
