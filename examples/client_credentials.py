"""A background job calling an API with a machine (client-credentials) token.

    OIDC_ISSUER=https://idp.example OIDC_CLIENT_ID=... OIDC_CLIENT_SECRET=... \
        python examples/client_credentials.py

With ``OIDC_ISSUER`` unset it runs against the in-process FakeIdP. However many workers ask at
once, the provider sees one token request per scope until the token is due again.
"""

from __future__ import annotations

import asyncio
import os

from asgi_token_refresh import OAuth2Client, Refresher, TokenParams
from asgi_token_refresh.testing import FakeIdP


def make_client() -> tuple[OAuth2Client, FakeIdP | None]:
    issuer = os.environ.get("OIDC_ISSUER")
    if issuer:
        client = OAuth2Client.from_discovery(
            issuer,
            client_id=os.environ["OIDC_CLIENT_ID"],
            client_secret=os.environ["OIDC_CLIENT_SECRET"],
        )
        return client, None
    idp = FakeIdP()
    client = OAuth2Client.from_discovery(
        "https://idp.test", client_id="app", client_secret="app-secret", transport=idp.transport()
    )
    return client, idp


async def job(refresher: Refresher, worker: int) -> str:
    token = await refresher.client_credentials(TokenParams(scope=os.environ.get("API_SCOPE")))
    # ... call the API with {"Authorization": f"Bearer {token.access_token}"} ...
    return f"worker {worker}: token expires at {token.expires_at:.0f}"


async def main() -> None:
    client, idp = make_client()
    refresher = Refresher.shared(client)
    for line in await asyncio.gather(*(job(refresher, n) for n in range(20))):
        print(line)
    if idp is not None:
        print(f"provider token requests: {idp.token_calls('client_credentials')} for 20 workers")
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
