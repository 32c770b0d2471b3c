"""PKCE as the fake provider checks it at the token endpoint (RFC 7636, S256 only).

Written independently of the library's own ``pkce_challenge``, so that a mistake in one is
caught by the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from ._http import Reject

__all__ = ["check_code_verifier"]

# RFC 7636 §4.1: 43 to 128 unreserved characters.
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def check_code_verifier(challenge: str | None, verifier: str | None) -> None:
    """Raise :class:`Reject` unless ``verifier`` answers the code's S256 ``challenge``."""
    if verifier is not None and not _VERIFIER.fullmatch(verifier):
        # Real providers check the form too (node oidc-provider does).
        raise Reject("invalid_request", "code_verifier must be 43 to 128 unreserved characters")
    # A verifier without a challenge is refused too (OAuth 2.1 PKCE downgrade protection).
    if (challenge is None) != (verifier is None) or (
        verifier is not None
        and challenge is not None
        and not hmac.compare_digest(_s256(verifier), challenge)
    ):
        raise Reject("invalid_grant", "PKCE verification failed")


def _s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier))), no padding."""
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
