"""Every error ``fmstream`` raises is under one base (``FmstreamError``), and the types that
replaced plain ``ValueError`` / ``RuntimeError`` still are those, so existing callers catch them."""

from __future__ import annotations

import pytest

from fmstream.errors import CredentialWatchError, FmstreamError, NoSamplesError, PriorityError
from fmstream.services import ServiceError
from fmstream.settings import UnknownSettingError


@pytest.mark.parametrize(("error", "builtin"), [
    (PriorityError, ValueError),
    (CredentialWatchError, ValueError),
    (NoSamplesError, ValueError),
    (UnknownSettingError, ValueError),
    (ServiceError, RuntimeError),
])
def test_each_error_is_an_fmstream_error_and_what_it_replaced(
    error: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(error, FmstreamError) and issubclass(error, builtin)
