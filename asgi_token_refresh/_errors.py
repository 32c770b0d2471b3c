"""The error hierarchy.

Callers decide on two questions only: must the user log in again (:class:`ReauthenticationRequired`)
or may they simply try again later (:class:`RefreshUnavailable`)? Everything is a
:class:`TokenRefreshError`. No message or attribute ever carries a token or a client secret.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "LoginFailed",
    "ReauthenticationRequired",
    "RefreshUnavailable",
    "TokenEndpointError",
    "TokenRefreshError",
]


class TokenRefreshError(Exception):
    """Base class of every error this package raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # The subclasses take keyword arguments, so rebuild from the instance dict rather than
        # from ``args``: this makes them picklable and lets ``copy.copy`` hand each waiter of a
        # shared flight its own exception object (raising one object from many tasks would
        # splice their tracebacks together).
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[TokenRefreshError], args: tuple[Any, ...], state: dict[str, Any]
) -> TokenRefreshError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigurationError(TokenRefreshError, ValueError):
    """The library was configured with values that cannot work."""


class TokenEndpointError(TokenRefreshError):
    """The token (or revocation) endpoint answered with an error or with garbage.

    Carries the RFC 6749 §5.2 fields. ``error`` is the provider's code when it sent one, else
    ``"invalid_response"`` for a body that is not a token response. ``status`` is the HTTP status.
    """

    def __init__(
        self,
        error: str,
        *,
        status: int | None = None,
        error_description: str | None = None,
        error_uri: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.error = error
        self.status = status
        self.error_description = error_description
        self.error_uri = error_uri
        self.retry_after = retry_after
        message = f"token endpoint error {error!r}"
        if status is not None:
            message += f" (HTTP {status})"
        if error_description:
            message += f": {error_description}"
        super().__init__(message)


class ReauthenticationRequired(TokenRefreshError):
    """Terminal: the session cannot get a new access token; the user must log in again.

    ``reason`` is one of ``invalid_grant``, ``invalid_client``, ``unauthorized_client``,
    ``no_session`` or ``downstream_401``. The provider's error, if any, is ``__cause__``.
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(
            f"reauthentication required: {reason}" + (f" ({detail})" if detail else "")
        )


class LoginFailed(TokenRefreshError):
    """A login could not be completed: the callback was refused, or its ID token was not valid.

    ``reason`` is a plain sentence for the user (the login routes answer it with a 400); it
    never contains a token, a code or a secret.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"login failed: {reason}")


class RefreshUnavailable(TokenRefreshError):
    """Transient: the provider could not be reached or failed; the session is kept.

    ``reason`` is ``provider_error`` (the provider answered with something other than a token
    set or a terminal error), ``timeout``, ``network_error`` or ``store_unavailable`` (the
    session store did not answer); ``retry_after`` is the number of seconds after which a
    retry makes sense (the provider's ``Retry-After`` when sent, clamped to 0..120).
    """

    def __init__(self, reason: str, *, retry_after: float, detail: str | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        self.detail = detail
        message = f"token refresh unavailable: {reason}, retry after {retry_after:g}s"
        super().__init__(message + (f" ({detail})" if detail else ""))
