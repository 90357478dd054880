"""gold_logprob: hermetic tests on hand-made logprobs, plus one test on the embedded model.

The hand-made responses copy the shape llama.cpp's server returns through ChatOpenAI
(``response_metadata["logprobs"] == {"content": [...], "refusal": None}``, ``bytes`` None,
the chosen token always listed in ``top_logprobs``); several use its real numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
from langchain_core.messages import AIMessage

from opro_agent.local_server import LocalServer
from opro_agent.logprobs import (
    MIN_LOGPROB,
    TokenLogprob,
    gold_logprob,
    mean_logprob,
    token_logprobs,
)
from tests.conftest import needs_llama


def entry(token: str, logprob: float, top: Sequence[tuple[str, float]] | None = None) -> Any:
    """One per-token entry; ``top`` defaults to the chosen token alone (llama.cpp's k=0)."""
    listed = [(token, logprob)] if top is None else top
    return {
        "token": token,
        "bytes": None,
        "logprob": logprob,
        "top_logprobs": [{"token": t, "bytes": None, "logprob": lp} for t, lp in listed],
    }


def message(*entries: Any, finish_reason: str = "stop") -> AIMessage:
    text = "".join(e["token"] for e in entries)
    return AIMessage(
        content=text,
        response_metadata={
            "model_provider": "openai",
            "finish_reason": finish_reason,
            "logprobs": {"content": list(entries), "refusal": None},
        },
    )


def lse(*values: float) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


# Real first-token distribution of SmolLM2-135M, system "Answer with only yes or no.",
# question "Is 4 an even number?", temperature 0, top_logprobs=5 (it answered "No, 4 is...").
FIRST = [("No", -1.1812), ("To", -2.0553), ("Yes", -2.1112), ("1", -2.4047), ("The", -2.5625)]
RAMBLE = message(
    entry("No", -1.1812, FIRST),
    entry(",", -0.3236, [(",", -0.3236), (".", -1.7446), ("", -2.9893)]),
    entry(" ", -0.2738, [(" ", -0.2738), (" the", -2.0268), (" not", -3.8346)]),
    entry("4", -0.0328, [("4", -0.0328), ("1", -3.8028)]),
    finish_reason="length",
)


# -- the greedy answer is the gold ---------------------------------------------------------


def test_greedy_matches_gold() -> None:
    assert gold_logprob(RAMBLE, "no") == pytest.approx(-1.1812)


def test_greedy_matches_gold_without_alternatives() -> None:
    # OpenAI without top_logprobs sends an empty list: the chosen tokens alone still count.
    msg = message({"token": "Yes", "bytes": [89], "logprob": -0.2, "top_logprobs": []})
    assert gold_logprob(msg, "yes") == pytest.approx(-0.2)


def test_case_variants_of_the_gold_are_summed() -> None:
    msg = message(
        entry("Yes", -0.4, [("Yes", -0.4), ("No", -1.6), (" yes", -2.5), ("yes", -3.0)]),
        entry(".", -0.1),
    )
    assert gold_logprob(msg, "yes") == pytest.approx(lse(-0.4, -2.5, -3.0))


def test_text_after_the_gold_is_not_checked() -> None:
    msg = message(entry("Yes", -0.3), entry(",", -0.5), entry(" because", -1.0))
    assert gold_logprob(msg, "yes") == pytest.approx(-0.3)


# -- the greedy answer is not the gold ---------------------------------------------------------


def test_diverges_at_first_token_with_gold_listed() -> None:
    assert gold_logprob(RAMBLE, "yes") == pytest.approx(-2.1112)
    assert gold_logprob(RAMBLE, "YES") == pytest.approx(-2.1112)


def test_gold_not_listed_is_bounded_by_the_smallest_listed_token() -> None:
    listed_mass = sum(math.exp(lp) for _, lp in FIRST)
    assert math.log(1 - listed_mass) > -2.5625  # so the top-k bound is the smaller one
    assert gold_logprob(RAMBLE, "maybe") == pytest.approx(-2.5625)


def test_gold_not_listed_is_bounded_by_the_unlisted_mass() -> None:
    # Only the chosen token is listed (top_logprobs=0): p("No") = 0.9 leaves at most 0.1.
    msg = message(entry("No", math.log(0.9)))
    assert gold_logprob(msg, "yes") == pytest.approx(math.log(0.1))


def test_flatter_distribution_ranks_a_missed_gold_higher() -> None:
    confident = message(entry("No", -0.05, [("No", -0.05), ("Maybe", -4.0)]))
    unsure = message(entry("No", -1.0, [("No", -1.0), ("Maybe", -1.5)]))
    confident_score, unsure_score = gold_logprob(confident, "yes"), gold_logprob(unsure, "yes")
    assert confident_score is not None and unsure_score is not None
    assert confident_score < unsure_score


def test_a_longer_number_does_not_cover_a_shorter_gold() -> None:
    # "42" is not the gold "4": the alternative "4" is.
    msg = message(entry("42", -0.5, [("42", -0.5), ("4", -1.5), ("40", -2.0)]))
    assert gold_logprob(msg, "4") == pytest.approx(-1.5)


# -- normalisation -------------------------------------------------------------------------


def test_case_and_whitespace_are_normalised() -> None:
    msg = message(entry(" NEW", -0.5), entry("  \n York", -0.25), entry(".", -0.1))
    assert gold_logprob(msg, "new york") == pytest.approx(-0.75)
    assert gold_logprob(msg, "  New\tYork ") == pytest.approx(-0.75)


def test_leading_whitespace_tokens_are_format() -> None:
    msg = message(entry("\n", -0.7), entry("Yes", -0.2))
    assert gold_logprob(msg, "yes") == pytest.approx(-0.2)


# -- multi-token gold ----------------------------------------------------------------------


def test_multi_token_gold_sums_its_tokens() -> None:
    msg = message(entry("4", -0.3), entry("2", -0.2))
    assert gold_logprob(msg, "42") == pytest.approx(-0.5)
    choice = message(entry("(", -0.1), entry("B", -0.7), entry(")", -0.05))
    assert gold_logprob(choice, "(B)") == pytest.approx(-0.85)


def test_multi_token_gold_diverging_midway() -> None:
    msg = message(entry("4", -0.3), entry("3", -0.9, [("3", -0.9), ("2", -1.2), ("5", -2.0)]))
    assert gold_logprob(msg, "42") == pytest.approx(-0.3 - 1.2)


def test_alternative_completing_the_gold_early_is_a_second_route() -> None:
    msg = message(entry("4", -0.5, [("4", -0.5), ("42", -1.0)]), entry("2", -0.25))
    assert gold_logprob(msg, "42") == pytest.approx(lse(-0.5 - 0.25, -1.0))


def test_response_ending_inside_the_gold_is_charged_for_the_rest() -> None:
    msg = message(entry("4", -0.3))
    assert gold_logprob(msg, "42") == pytest.approx(-0.3 - math.log(2))


# -- lead-ins ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lead_in",
    [
        ["Answer", ":"],
        ["The", " answer", " is", ":"],
        ["**", "Answer", ":**"],
        ["\n", "Final", " answer", " ="],
    ],
)
def test_lead_in_is_skipped(lead_in: list[str]) -> None:
    msg = message(*(entry(t, -1.5) for t in lead_in), entry(" yes", -0.4), entry(".", -0.2))
    assert gold_logprob(msg, "yes") == pytest.approx(-0.4)


def test_answer_that_looks_like_a_lead_in_is_not_skipped() -> None:
    msg = message(entry("A", -0.3), entry(":", -0.5), entry(" red", -0.2))
    assert gold_logprob(msg, "a") == pytest.approx(-0.3)


def test_lead_in_without_answer_diverges_at_its_last_token() -> None:
    msg = message(entry("Answer", -0.2), entry(":", -0.1, [(":", -0.1), (" yes", -3.0)]))
    assert gold_logprob(msg, "yes") == pytest.approx(-3.0)


def test_whitespace_only_response_uses_the_listed_alternatives() -> None:
    msg = message(entry("\n", -0.4, [("\n", -0.4), ("Yes", -2.0), (" ", -2.5)]))
    assert gold_logprob(msg, "yes") == pytest.approx(-2.0)


def test_rambling_answer_is_scored_at_its_first_token() -> None:
    msg = message(
        entry("That", -1.0, [("That", -1.0), ("Yes", -1.4)]),
        entry(" is", -0.1),
        entry(" yes", -0.1),
    )
    assert gold_logprob(msg, "yes") == pytest.approx(-1.4)


# -- no logprobs, other shapes -------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        AIMessage(content="Yes"),  # a provider that never returns logprobs
        AIMessage(content="Yes", response_metadata={"logprobs": None}),  # llama.cpp, k unset
        {"logprobs": {"content": [], "refusal": None}},  # empty generation
        {"logprobs": {"content": None, "refusal": "I cannot help"}},
        {"finish_reason": "stop"},
        {"logprobs": {"content": [{"token": "Yes", "logprob": None}]}},
        {"logprobs": {"content": [{"token": "Yes", "logprob": float("nan")}]}},
        {"logprobs": {"content": [{"token": 7, "logprob": -0.1}]}},
        {"logprobs": {"content": ["Yes"]}},
        {"logprobs": "Yes"},
    ],
)
def test_no_usable_logprobs_gives_none(source: Any) -> None:
    assert gold_logprob(source, "yes") is None


def test_accepts_message_metadata_logprobs_and_content() -> None:
    metadata = RAMBLE.response_metadata
    for source in (RAMBLE, metadata, metadata["logprobs"], metadata["logprobs"]["content"]):
        assert gold_logprob(source, "yes") == pytest.approx(-2.1112)


def test_token_logprobs_parses_and_skips_bad_alternatives() -> None:
    content = [
        {
            "token": "Yes",
            "logprob": -9999.0,  # OpenAI's "rounds to zero"
            "top_logprobs": [{"token": "No", "logprob": -0.01}, {"token": None}, "junk"],
        },
        {"token": ".", "logprob": 1e-7},  # rounding above zero
    ]
    assert token_logprobs(content) == [
        TokenLogprob("Yes", MIN_LOGPROB, (("No", -0.01),)),
        TokenLogprob(".", 0.0),
    ]
    assert gold_logprob(content, "yes") == pytest.approx(MIN_LOGPROB)


def test_blank_gold_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        gold_logprob(RAMBLE, " \n")


def test_mean_logprob() -> None:
    assert mean_logprob([-1.0, -2.0, -4.5]) == pytest.approx(-2.5)
    assert mean_logprob(iter([-1.0, None])) is None
    with pytest.raises(ValueError):
        mean_logprob([])
    with pytest.raises(ValueError):
        mean_logprob([float("nan")])


# -- integration: the real llama.cpp server ------------------------------------------------


@pytest.mark.integration
@needs_llama
def test_real_responses_give_finite_estimates(embedded_server: LocalServer) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    llm = ChatOpenAI(
        base_url=embedded_server.base_url,
        api_key=SecretStr("unused"),
        model=embedded_server.model_name,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"max_tokens": 8},
    )
    question = "Is 4 an even number?"
    for instruction in ("Answer with only yes or no.", "Write a poem about the sea."):
        reply = llm.invoke([("system", instruction), ("human", question)])
        tokens = token_logprobs(reply)
        assert tokens, reply.response_metadata
        # llama.cpp lists the chosen token among its alternatives (k, or k + 1 if it is not
        # in the top k).
        assert all(1 <= len(t.top) <= 6 for t in tokens)
        for gold in ("yes", "no"):
            score = gold_logprob(reply, gold)
            assert score is not None
            assert MIN_LOGPROB <= score <= 0.0
