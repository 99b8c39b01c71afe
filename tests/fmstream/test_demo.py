"""The demo's answer tables name the model version that answered (it used to vanish: "[model v3]"
is rich markup syntax)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fmstream.demo import show_answer
from stream.schemas import ErrorInfo, Response, ScoredItem


@pytest.fixture
def printed() -> io.StringIO:
    return io.StringIO()


def _show(printed: io.StringIO, title: str, resp: Response, names: dict[str, str]) -> None:
    show_answer(title, resp, names, out=Console(file=printed, width=120, color_system=None))


def test_answer_tables_show_the_model_version(printed: io.StringIO) -> None:
    resp = Response(request_id="r", items=[ScoredItem(item_id="i1", score=1.5)], model_version=7)
    _show(printed, "u2i for user [u0]", resp, {"i1": "Item one"})
    text = printed.getvalue()
    assert "[model v7]" in text and "u2i for user [u0]" in text and "Item one" in text


def test_fallback_and_errors_are_printed_verbatim(printed: io.StringIO) -> None:
    _show(printed, "u2i", Response(request_id="r", model_version=2, fallback="popular"), {})
    _show(printed, "rank", Response(request_id="r", model_version=3, error=ErrorInfo(
        code="unknown_user", message="user [x] has no vector")), {})
    text = printed.getvalue()
    assert "[model v2, fallback=popular]" in text
    assert "rank: unknown_user: user [x] has no vector" in text
