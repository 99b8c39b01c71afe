"""The demo's answer tables name the model version that answered (it used to vanish: "[model v3]"
is rich markup syntax)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fmstream import demo
from stream.schemas import ErrorInfo, Response, ScoredItem


@pytest.fixture
def printed(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(demo, "console", Console(file=out, width=120, color_system=None))
    return out


def test_answer_tables_show_the_model_version(printed: io.StringIO) -> None:
    resp = Response(request_id="r", items=[ScoredItem(item_id="i1", score=1.5)], model_version=7)
    demo._show("u2i for user [u0]", resp, {"i1": "Item one"})
    text = printed.getvalue()
    assert "[model v7]" in text and "u2i for user [u0]" in text and "Item one" in text


def test_fallback_and_errors_are_printed_verbatim(printed: io.StringIO) -> None:
    demo._show("u2i", Response(request_id="r", model_version=2, fallback="popular"), {})
    demo._show("rank", Response(request_id="r", model_version=3, error=ErrorInfo(
        code="unknown_user", message="user [x] has no vector")), {})
    text = printed.getvalue()
    assert "[model v2, fallback=popular]" in text
    assert "rank: unknown_user: user [x] has no vector" in text
