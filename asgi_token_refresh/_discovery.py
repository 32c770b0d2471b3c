"""Where a provider's endpoints come from: given, or discovered once.

OIDC discovery (``{issuer}/.well-known/openid-configuration``) is fetched on first use and
shared by concurrent first callers on a loop; failures are not cached. Several providers
publish their revocation endpoint only in RFC 8414 authorization-server metadata, whose
well-known path goes between the host and the issuer's path (§3.1): it fills that gap.
Endpoints passed explicitly always win.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from urllib.parse import urlsplit

from ._errors import ConfigurationError, RefreshUnavailable
from ._oauth_messages import DEFAULT_RETRY_AFTER, ProviderMetadata
from ._per_loop import PerLoop
from ._provider_http import ProviderHTTP

__all__ = [
    "OAUTH_METADATA_PATH",
    "OIDC_CONFIGURATION_PATH",
    "Discovery",
    "oauth_metadata_url",
    "oidc_configuration_url",
]

logger = logging.getLogger(__name__)

OIDC_CONFIGURATION_PATH = "/.well-known/openid-configuration"
OAUTH_METADATA_PATH = "/.well-known/oauth-authorization-server"


def oidc_configuration_url(issuer: str) -> str:
    """OpenID Connect Discovery §4: the well-known path goes after the issuer, path included."""
    return issuer.rstrip("/") + OIDC_CONFIGURATION_PATH


def oauth_metadata_url(issuer: str) -> str:
    """RFC 8414 §3.1: the well-known path goes between the host and the issuer's path."""
    parts = urlsplit(issuer)
    return f"{parts.scheme}://{parts.netloc}{OAUTH_METADATA_PATH}{parts.path.rstrip('/')}"


class Discovery:
    """The provider's metadata: ``known`` as given, or discovered from ``issuer`` with the
    ``explicit`` endpoints laid over it."""

    def __init__(
        self,
        http: ProviderHTTP,
        *,
        issuer: str | None,
        known: ProviderMetadata | None,
        explicit: dict[str, str],
    ) -> None:
        self._http = http
        self._issuer = issuer
        self._metadata = known
        self._explicit = explicit
        # Concurrent first callers on one loop share one fetch.
        self._pending: PerLoop[dict[str, asyncio.Future[ProviderMetadata]]] = PerLoop(dict)

    async def metadata(self) -> ProviderMetadata:
        if self._metadata is not None:
            return self._metadata
        pending = self._pending.get()
        discovery = pending.get("discovery")
        if discovery is None:
            discovery = pending["discovery"] = asyncio.ensure_future(self._fetch())
        try:
            # shield: one impatient caller must not cancel discovery for everyone else.
            self._metadata = await asyncio.shield(discovery)
        except BaseException:
            if discovery.done():
                pending.pop("discovery", None)  # failures are not cached: the next one retries
            raise
        return self._metadata

    async def _fetch(self) -> ProviderMetadata:
        assert self._issuer is not None
        url = oidc_configuration_url(self._issuer)
        status, _, body = await self._http.send("GET", url)
        if status == 429 or status >= 500:
            raise RefreshUnavailable(
                "provider_error", retry_after=DEFAULT_RETRY_AFTER, detail=f"discovery HTTP {status}"
            )
        if status != 200:
            raise ConfigurationError(f"discovery at {url} answered HTTP {status}")
        metadata = ProviderMetadata.from_discovery_document(body, issuer=self._issuer)
        if metadata.revocation_endpoint is None and "revocation_endpoint" not in self._explicit:
            metadata = await self._with_oauth_metadata(metadata)
        return dataclasses.replace(metadata, **self._explicit)

    async def _with_oauth_metadata(self, metadata: ProviderMetadata) -> ProviderMetadata:
        assert self._issuer is not None
        url = oauth_metadata_url(self._issuer)
        try:
            status, _, body = await self._http.send("GET", url)
            if status != 200:
                return metadata
            oauth = ProviderMetadata.from_discovery_document(body, issuer=self._issuer)
        except (RefreshUnavailable, ConfigurationError) as exc:
            logger.info("no usable RFC 8414 metadata at %s (%s)", url, exc)
            return metadata
        return dataclasses.replace(metadata, revocation_endpoint=oauth.revocation_endpoint)
