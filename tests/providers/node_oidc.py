"""node ``oidc-provider`` (npm, pinned in ``node_oidc/package-lock.json``) on loopback: a real,
independently written OpenID provider for the tests and for ``probe``'s tests.

    with running_node_oidc_provider(tmp_path, redirect_uris=[app_url + "/auth/callback"]) as op:
        op.issuer                       # http://127.0.0.1:PORT/oidc (a path prefix, on purpose)
        tokens = op.log_in("alice")     # its own login and consent forms; the token response
        op.refresh(tokens["refresh_token"]).json()
        op.counts().token_calls("refresh_token", "success")   # what the provider counted

Policy (``provider.js``): refresh tokens rotate (``rotate_refresh_tokens``) and a consumed one
presented again revokes the whole grant (oidc-provider's own rule, no grace window); access
tokens live ``access_token_ttl`` seconds, exactly (``clock_tolerance`` 0); refresh tokens are
issued for ``offline_access`` only, which needs ``prompt=consent``; revocation (RFC 7009),
userinfo and RP-initiated logout are on; one confidential client (``client_secret_basic``).
The counts are the provider's: it listens to its own events (``grant.success``,
``grant.error``, ``refresh_token.consumed``, ``grant.revoked``) and serves them on a second
loopback port.

Why the issuer has a path prefix: many providers publish one (Keycloak's ``/realms/NAME``,
Entra ID's ``/TENANT/v2.0``), and discovery, the ``iss`` of ID tokens and of the authorization
response (RFC 9207) must all keep it. Mounting oidc-provider under ``/oidc`` is its documented
way (it reads the mount path from ``req.originalUrl``).

``node`` is the only runtime needed; ``scripts/provider-deps`` installs the npm packages
(``npm ci``), and ``scripts/test`` runs it, after ``scripts/system-deps`` installed Debian's
``nodejs`` and ``npm`` if they were missing. The process is started and stopped by its PID.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from ..processes import HOST, free_port, spawn, stop, tail, wait_until

PACKAGE_DIR = Path(__file__).resolve().parent / "node_oidc"
SCRIPT = PACKAGE_DIR / "provider.js"
PATH_PREFIX = "/oidc"
CLIENT_ID = "app"
CLIENT_SECRET = "app-secret"
#: Registered for :meth:`NodeOIDCProvider.log_in`, which reads the code off the redirect and
#: never follows it: nothing needs to listen there.
HARNESS_REDIRECT_URI = "http://127.0.0.1:9/harness/callback"
OFFLINE_SCOPE = "openid offline_access"


def missing_runtime() -> str | None:
    """Why the provider cannot run here, when ``node`` itself is not installed (the only
    reason to skip); None when it can. Missing npm packages are an installation error instead
    (:func:`running_node_oidc_provider` raises, naming ``scripts/provider-deps``)."""
    if shutil.which("node") is None:
        return (
            "node is not installed: the real-provider suite needs node and npm (Debian's "
            "nodejs and npm packages; scripts/system-deps installs them, then "
            "scripts/provider-deps installs node oidc-provider)"
        )
    return None


def oidc_provider_version() -> str:
    """The oidc-provider version pinned in package.json (``npm ci`` installs exactly it)."""
    pinned: str = json.loads((PACKAGE_DIR / "package.json").read_text())["dependencies"][
        "oidc-provider"
    ]
    return pinned


def _installed_version() -> str | None:
    installed = PACKAGE_DIR / "node_modules" / "oidc-provider" / "package.json"
    if not installed.exists():
        return None
    version: str = json.loads(installed.read_text())["version"]
    return version


# -- what the provider counted --------------------------------------------------------------------


@dataclass(frozen=True)
class TokenError:
    """One token-endpoint error, as the provider raised it: ``detail`` is its own reason
    (``refresh token already used``), which the answer does not carry."""

    grant_type: str
    error: str
    detail: str | None
    status: int


@dataclass(frozen=True)
class Counts:
    """A snapshot of the provider's own counts (``GET /counts`` on its admin port)."""

    raw: Mapping[str, Any]

    def token_calls(self, grant_type: str | None = None, outcome: str | None = None) -> int:
        """Token requests answered, of ``grant_type`` (all without), with ``outcome``:
        ``"success"`` or the OAuth ``error`` (``"invalid_grant"``); all outcomes without."""
        table: Mapping[str, Mapping[str, int]] = self.raw["token"]
        return sum(
            n
            for kind, outcomes in table.items()
            if grant_type is None or kind == grant_type
            for result, n in outcomes.items()
            if outcome is None or result == outcome
        )

    def requests(self, route: str, status: int | None = None) -> int:
        """Requests to one of the provider's routes (``token``, ``userinfo``, ``revocation``,
        ``end_session``, ``discovery``...), answered with ``status`` (any without)."""
        statuses: Mapping[str, int] = self.raw["requests"].get(route, {})
        return sum(n for code, n in statuses.items() if status is None or int(code) == status)

    @property
    def refresh_calls(self) -> int:
        return self.token_calls("refresh_token")

    @property
    def refresh_tokens_consumed(self) -> int:
        """Refresh tokens rotated: each successful refresh consumes one when rotation is on."""
        consumed: int = self.raw["refresh_tokens_consumed"]
        return consumed

    @property
    def grants_revoked(self) -> int:
        """Grants revoked, by a reused refresh token or by revocation (RFC 7009)."""
        revoked: int = self.raw["grants_revoked"]
        return revoked

    @property
    def revoked_grant_ids(self) -> list[str]:
        return list(self.raw["revoked_grant_ids"])

    @property
    def token_errors(self) -> list[TokenError]:
        return [TokenError(**error) for error in self.raw["token_errors"]]

    @property
    def server_errors(self) -> int:
        errors: int = self.raw["server_errors"]
        return errors


# -- the provider's forms -------------------------------------------------------------------------


@dataclass
class _Form:
    action: str
    ident: str | None
    fields: dict[str, str] = field(default_factory=dict)
    submit: tuple[str, str] | None = None  # the first named submit button: (name, value)


class _Forms(HTMLParser):
    """The forms of a page, with their inputs and named submit buttons, including buttons
    outside a form that name it (``form="op.logoutForm"``, as oidc-provider's logout page)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []
        self._open: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {name: value or "" for name, value in attrs}
        if tag == "form":
            self._open = _Form(action=a.get("action", ""), ident=a.get("id"))
            self.forms.append(self._open)
            return
        owner = self._owner(a.get("form"))
        if owner is None or "name" not in a:
            return
        kind = a.get("type", "submit" if tag == "button" else "text")
        if tag == "input" and kind != "submit":
            owner.fields[a["name"]] = a.get("value", "")
        elif tag in ("button", "input") and kind == "submit" and owner.submit is None:
            owner.submit = (a["name"], a.get("value", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None

    def _owner(self, ident: str | None) -> _Form | None:
        if ident:
            return next((form for form in self.forms if form.ident == ident), None)
        return self._open


def form_to_submit(response: httpx.Response, login: str) -> tuple[str, dict[str, str]] | None:
    """The first form of an HTML page as a user submits it: its action URL and fields, the
    login form filled with ``login`` (any password), the first named submit button pressed
    (the logout page's "Yes, sign me out"). None when the page has no form."""
    if "html" not in response.headers.get("content-type", ""):
        return None
    parser = _Forms()
    parser.feed(response.text)
    if not parser.forms:
        return None
    form = parser.forms[0]
    data = dict(form.fields)
    if "login" in data:
        data["login"] = login
    if "password" in data:
        data["password"] = "any password"  # the dev login takes any
    if form.submit is not None:
        data.setdefault(*form.submit)
    return urljoin(str(response.url), form.action), data


# -- the provider ---------------------------------------------------------------------------------


@dataclass
class NodeOIDCProvider:
    """A running node oidc-provider (see the module's docstring)."""

    issuer: str  # what the apps configure; under PATH_PREFIX, on issuer_port
    url: str  # where it listens itself (the issuer, unless a proxy stands in front)
    admin_url: str
    client_id: str
    client_secret: str
    access_token_ttl: int
    rotate_refresh_tokens: bool
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def port(self) -> int:
        """The port it listens on itself (a proxy in front forwards there)."""
        port = urlsplit(self.url).port
        assert port is not None
        return port

    @property
    def version(self) -> str:
        return oidc_provider_version()

    def output(self) -> str:
        """The provider's own log (its warnings and any server_error)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- its counts and state

    def counts(self) -> Counts:
        response = httpx.get(self.admin_url + "/counts", timeout=10.0)
        response.raise_for_status()
        return Counts(response.json())

    def inspect(
        self,
        *,
        refresh_token: str | None = None,
        access_token: str | None = None,
        grant_id: str | None = None,
    ) -> dict[str, Any]:
        """What the provider holds for these (test-only): ``refresh_token`` → found, consumed,
        expired, grant_id; ``access_token`` → found, expired, grant_id; ``grant`` (of
        ``grant_id``, or the refresh token's) → id, active."""
        query = {"refresh_token": refresh_token, "access_token": access_token, "grant_id": grant_id}
        response = httpx.post(
            self.admin_url + "/inspect",
            json={key: value for key, value in query.items() if value},
            timeout=10.0,
        )
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        return state

    # -- its endpoints, called directly (not through a proxy)

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Its discovery document, read at :attr:`url`: the endpoints there."""
        response = httpx.get(self.url + "/.well-known/openid-configuration", timeout=10.0)
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document

    def endpoint(self, name: str) -> str:
        """``token_endpoint``, ``userinfo_endpoint``, ``revocation_endpoint``... at :attr:`url`."""
        url: str = self.metadata[name]
        return url

    def token_request(self, **form: str) -> httpx.Response:
        """A POST to the token endpoint with the client's credentials (HTTP Basic)."""
        return httpx.post(
            self.endpoint("token_endpoint"),
            data=form,
            auth=(self.client_id, self.client_secret),
            timeout=10.0,
        )

    def refresh(self, refresh_token: str) -> httpx.Response:
        return self.token_request(grant_type="refresh_token", refresh_token=refresh_token)

    def userinfo(self, access_token: str) -> httpx.Response:
        return httpx.get(
            self.endpoint("userinfo_endpoint"),
            headers={"authorization": f"Bearer {access_token}"},
            timeout=10.0,
        )

    def revoke(self, token: str, hint: str | None = None) -> httpx.Response:
        form = {"token": token} | ({"token_type_hint": hint} if hint else {})
        return httpx.post(
            self.endpoint("revocation_endpoint"),
            data=form,
            auth=(self.client_id, self.client_secret),
            timeout=10.0,
        )

    def log_in(self, subject: str = "alice", scope: str = OFFLINE_SCOPE) -> dict[str, Any]:
        """Log ``subject`` in through the provider's own forms (authorization code, PKCE S256,
        ``prompt=consent``), as a throwaway login: the token endpoint's JSON answer (with a
        ``refresh_token`` when ``scope`` has ``offline_access``)."""
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        state = secrets.token_urlsafe(16)
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": HARNESS_REDIRECT_URI,
            "scope": scope,
            "state": state,
            "nonce": secrets.token_urlsafe(16),
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
            "prompt": "consent",
        }
        with httpx.Client(timeout=10.0) as browser:
            response = browser.get(self.endpoint("authorization_endpoint"), params=params)
            for _ in range(20):
                location = response.headers.get("location")
                if response.is_redirect and location is not None:
                    target = urljoin(str(response.url), location)
                    if target.startswith(HARNESS_REDIRECT_URI):
                        break
                    response = browser.get(target)
                elif (form := form_to_submit(response, subject)) is not None:
                    response = browser.post(form[0], data=form[1])
                else:
                    raise RuntimeError(f"login stopped at {response.url}: {response.text[:500]}")
            else:
                raise RuntimeError("login did not come back after 20 steps")
        answer = {key: values[0] for key, values in parse_qs(urlsplit(target).query).items()}
        if answer.get("state") != state or "code" not in answer:
            raise RuntimeError(f"login was refused: {answer.get('error')}")
        token = self.token_request(
            grant_type="authorization_code",
            code=answer["code"],
            redirect_uri=HARNESS_REDIRECT_URI,
            code_verifier=verifier,
        )
        token.raise_for_status()
        tokens: dict[str, Any] = token.json()
        return tokens

    async def through_forms(
        self,
        browser: httpx.AsyncClient,
        response: httpx.Response,
        login: str = "alice",
    ) -> httpx.Response:
        """Continue a browser's visit to the provider: while ``response`` (redirects followed)
        is one of the provider's pages with a form (login, consent, logout confirmation),
        submit it as a user would and follow the redirects. Returns the first response off
        the provider (the app's page the provider sent the browser back to)."""
        for _ in range(10):
            if not self._is_provider_page(response):
                return response
            form = form_to_submit(response, login)
            if form is None:
                raise RuntimeError(f"no form at {response.url}: {response.text[:500]}")
            response = await browser.post(form[0], data=form[1], follow_redirects=True)
        raise RuntimeError("the provider kept asking after 10 forms")

    def _is_provider_page(self, response: httpx.Response) -> bool:
        return any(str(response.url).startswith(base) for base in (self.issuer, self.url))


@contextlib.contextmanager
def running_node_oidc_provider(
    workdir: Path,
    *,
    redirect_uris: Sequence[str] = (),
    post_logout_redirect_uris: Sequence[str] = (),
    access_token_ttl: int = 4,
    refresh_token_ttl: int = 86_400,
    rotate_refresh_tokens: bool = True,
    clock_tolerance: int = 0,
    application_type: str = "web",
    issuer_port: int | None = None,
    client_id: str = CLIENT_ID,
    client_secret: str = CLIENT_SECRET,
) -> Iterator[NodeOIDCProvider]:
    """A node oidc-provider on free loopback ports for the ``with`` block (its configuration
    and log in ``workdir``), ready (discovery answers) when this yields; always stopped by PID.

    ``redirect_uris`` and ``post_logout_redirect_uris`` are registered for the client, exactly
    (oidc-provider matches them exactly), besides :data:`HARNESS_REDIRECT_URI`; with
    ``application_type="native"`` a loopback ``http`` redirect URI matches on any port (RFC 8252
    §7.3), for a command-line login whose callback port is picked when it runs.
    ``clock_tolerance``: seconds past its ``exp`` that oidc-provider still accepts a token
    (its default is 15; 0 here, so that a token is dead when its ``expires_in`` says).
    ``issuer_port``: the port the issuer names when something else listens there and forwards
    to the provider (a proxy); by default the provider's own."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(missing_runtime())
    installed = _installed_version()
    if installed != oidc_provider_version():
        raise RuntimeError(
            f"node oidc-provider {oidc_provider_version()} is not installed in {PACKAGE_DIR} "
            f"(found: {installed}): run scripts/provider-deps (npm ci; scripts/test runs it)"
        )
    # Not a port the caller is about to bind: its apps' (from the URIs) or its proxy's.
    wanted = [urlsplit(uri).port for uri in (*redirect_uris, *post_logout_redirect_uris)]
    taken = {port for port in (*wanted, issuer_port) if port is not None}
    port = free_port(avoid=taken)
    admin_port = free_port(avoid={*taken, port})
    issuer = f"http://{HOST}:{issuer_port or port}{PATH_PREFIX}"
    client = {
        "client_id": client_id,
        "client_secret": client_secret,
        "redirect_uris": [*redirect_uris, HARNESS_REDIRECT_URI],
        "post_logout_redirect_uris": list(post_logout_redirect_uris),
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
        "application_type": application_type,
    }
    config = {
        "issuer": issuer,
        "port": port,
        "admin_port": admin_port,
        "clients": [client],
        "access_token_ttl": access_token_ttl,
        "refresh_token_ttl": refresh_token_ttl,
        "rotate_refresh_tokens": rotate_refresh_tokens,
        "clock_tolerance": clock_tolerance,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"node-oidc-{port}.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = workdir / f"node-oidc-{port}.log"
    process = spawn([node, str(SCRIPT), str(config_path)], log=log, cwd=PACKAGE_DIR)
    try:
        provider = NodeOIDCProvider(
            issuer=issuer,
            url=f"http://{HOST}:{port}{PATH_PREFIX}",
            admin_url=f"http://{HOST}:{admin_port}",
            client_id=client_id,
            client_secret=client_secret,
            access_token_ttl=access_token_ttl,
            rotate_refresh_tokens=rotate_refresh_tokens,
            process=process,
            log=log,
        )

        def ready() -> bool:
            discovery = httpx.get(provider.url + "/.well-known/openid-configuration", timeout=2)
            counts = httpx.get(provider.admin_url + "/counts", timeout=2)
            return discovery.status_code == 200 and counts.status_code == 200

        if not wait_until("node oidc-provider", ready, process, log=log):
            raise RuntimeError(f"node oidc-provider did not get ready\n{tail(log)}")
        yield provider
    finally:
        stop(process)
