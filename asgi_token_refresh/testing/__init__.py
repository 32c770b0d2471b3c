"""Test helpers: a movable clock, a fake OAuth2/OIDC provider and a loopback server.

:class:`FakeIdP` is a plain ASGI app that behaves like a real provider where it matters for
refresh storms: rotating refresh tokens, reuse detection that revokes the whole token family,
Okta-style grace periods and Keycloak-style reuse counts, scripted failures (:class:`Fault`) and
a gate that parks token requests so tests can line up concurrency without sleeping.

It is an OpenID Provider too: ID tokens signed with real RS256 or ES256 keys published as a
JWK Set, key rotation, deliberately bad ID tokens for the relying party's checks
(:meth:`FakeIdP.tamper_next_id_token`), an ``end_session_endpoint``, and RFC 8414 metadata
beside OIDC discovery.

Use it in-process through :meth:`FakeIdP.transport`, or over real sockets with :func:`serve`.
Only the standard library and httpx are needed until an ID token, the JWKS or a logout needs
a key: that takes ``cryptography`` and PyJWT (the ``oidc`` extra). :func:`serve` also needs
uvicorn, and :func:`capture_telemetry` needs ``opentelemetry-sdk``.

Layout: ``_clock`` (FakeClock), ``_faults`` (Fault, Gate), ``_grants`` (the provider's tokens,
sessions and the rules for issuing them), ``_pkce`` (the code verifier's check), ``_keys``
(signing keys, JWKS, tampered tokens), ``_fake_idp`` (the ASGI app, ``/authorize`` and
``/token``), ``_endpoints`` (metadata, JWKS, userinfo, revocation, logout), ``_http`` (ASGI
plumbing and client authentication), ``_server`` (serve) and ``_telemetry`` (in-memory spans
and metrics).
"""

from ._clock import FakeClock
from ._fake_idp import FakeIdP
from ._faults import Fault, Gate
from ._http import ASGIApp as ASGIApp  # the type serve() accepts; importable from here as before
from ._server import serve
from ._telemetry import CapturedTelemetry, capture_telemetry

__all__ = [
    "CapturedTelemetry",
    "FakeClock",
    "FakeIdP",
    "Fault",
    "Gate",
    "capture_telemetry",
    "serve",
]
