"""How long a query may be: the model's positions less the image, the template and the answer;
checked before any work, with the limit in tokens and characters."""

from __future__ import annotations

import numpy as np
import pytest

from lisa_model.checkpoint import load_lisa
from lisa_model.cli.segment import main as segment_main
from lisa_model.demo import demo_model_dir
from lisa_model.predictor import LisaPredictor, QueryTooLongError

COMMAND = (
    "please pick up the small red cup that is next to the blue plate on the left side of "
    "the kitchen table and bring it to me carefully"
)
WORDS = tuple(COMMAND.split())


@pytest.fixture(scope="module")
def demo() -> LisaPredictor:
    """The embedded demo model: 512 positions, 256 of them for the image."""
    return LisaPredictor(load_lisa(demo_model_dir()))


def words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


def longest_accepted(predictor: LisaPredictor, **options) -> tuple[str, str]:
    """The longest query of :func:`words` that passes ``check_query`` and the next longer one."""
    previous = None
    for n in range(1, 1000):
        query = words(n)
        try:
            predictor.check_query(query, **options)
        except QueryTooLongError:
            return previous, query
        previous = query
    raise AssertionError("no query was too long")


def test_budget_of_the_demo_model(demo):
    budget = demo.query_budget()
    assert budget.positions == 512 and budget.image_tokens == 256 and budget.answer_tokens == 63
    # The template and the answer take positions too: well under 512 - 256 remain for the query.
    assert 0 < budget.max_tokens < 512 - 256 - 63
    assert budget.max_chars_estimate > budget.max_tokens  # more than one character per token
    assert demo.max_query_tokens() == budget.max_tokens
    # Less room to answer, more for the query; the fast path needs no answer positions.
    assert demo.max_query_tokens(max_new_tokens=16) == budget.max_tokens + 48
    assert demo.max_query_tokens(mode="segment") == budget.max_tokens + 63
    assert demo.max_query_tokens(max_new_tokens=400) == 0


@pytest.mark.parametrize("options", [{}, {"mode": "segment"}, {"explain": True},
                                     {"raw_prompt": True}, {"max_new_tokens": 8}])  # fmt: skip
def test_too_long_is_a_typed_error_at_the_exact_limit(demo, options):
    fits, too_long = longest_accepted(demo, **options)
    with pytest.raises(QueryTooLongError) as info:
        demo.check_query(too_long, **options)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.tokens > error.max_tokens and error.positions == 512
    assert error.max_chars_estimate > 0
    message = str(error)
    assert f"{error.tokens} tokens" in message and f"at most {error.max_tokens} tokens" in message
    assert f"about {error.max_chars_estimate} characters" in message
    # The published budget is never more than what fits (it is the smaller of the styles).
    tokenizer = demo.model.tokenizer
    assert (
        len(tokenizer.encode(fits, add_special_tokens=False))
        >= demo.max_query_tokens(**options) - 2
    )


def test_every_query_within_the_budget_is_accepted(demo):
    """Word sequences of every length up to the budget (phrases and sentences) pass."""
    tokenizer = demo.model.tokenizer
    budget = demo.max_query_tokens()
    for offset in range(0, len(WORDS), 3):
        for n in range(1, 200):
            for query in (words(n, offset), words(n, offset) + "."):
                if len(tokenizer.encode(query, add_special_tokens=False)) > budget:
                    break
                demo.check_query(query)


def test_predict_runs_at_the_limit_and_refuses_past_it(demo):
    options = {"max_new_tokens": 8}
    fits, too_long = longest_accepted(demo, **options)
    demo.set_image(np.full((64, 80, 3), 120, np.uint8))
    result = demo.predict(fits, **options)  # the longest query still runs through the model
    assert result.masks.shape[1:] == (64, 80)
    with pytest.raises(QueryTooLongError):
        demo.predict(too_long, **options)
    with pytest.raises(ValueError, match="empty"):
        demo.check_query("  ")


def test_lisa_segment_refuses_a_long_query_with_one_line(demo, tmp_path, capsys):
    _, too_long = longest_accepted(demo)
    image = demo_model_dir().parent / "examples" / "scene_0.png"
    code = segment_main(["--image", str(image), "--query", too_long,
                         "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("lisa-segment: error: --query: query too long: ")
    assert "characters" in err and not (tmp_path / "out").exists()
