import copy
import pickle

import pytest

from asgi_token_refresh import (
    ConfigurationError,
    ReauthenticationRequired,
    RefreshUnavailable,
    TokenEndpointError,
    TokenRefreshError,
)

ERRORS = [
    ReauthenticationRequired("invalid_grant", "grant revoked"),
    RefreshUnavailable("provider_error", retry_after=7, detail="HTTP 503"),
    TokenEndpointError("invalid_scope", status=400, error_description="bad", error_uri="u"),
    ConfigurationError("bad option"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_is_a_token_refresh_error(error: Exception) -> None:
    assert isinstance(error, TokenRefreshError)


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_survive_copy_and_pickle_with_their_fields(error: Exception) -> None:
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):  # noqa: S301
        assert type(clone) is type(error)
        assert str(clone) == str(error)
        assert vars(clone) == vars(error)
        assert clone is not error


def test_token_endpoint_error_carries_rfc6749_fields() -> None:
    error = TokenEndpointError(
        "invalid_grant", status=403, error_description="reused", error_uri="https://x/e"
    )
    assert (error.error, error.status, error.error_description, error.error_uri) == (
        "invalid_grant",
        403,
        "reused",
        "https://x/e",
    )
    assert str(error) == "token endpoint error 'invalid_grant' (HTTP 403): reused"


def test_refresh_unavailable_says_when_to_retry() -> None:
    error = RefreshUnavailable("timeout", retry_after=2.5)
    assert error.retry_after == 2.5
    assert error.reason == "timeout"
    assert "retry after 2.5s" in str(error)
