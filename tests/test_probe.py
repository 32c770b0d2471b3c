"""`asgi-token-refresh probe`: each FakeIdP policy over loopback yields its table, JSON and exit
code; the browser login through a loopback redirect; usage and provider errors; and no token the
provider issued ever appears in what the command prints or logs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest

from asgi_token_refresh.__main__ import main
from asgi_token_refresh._probe import add_probe_arguments, run_probe
from asgi_token_refresh._probe.findings import Findings, Refusal, Reuse, SearchBounds
from asgi_token_refresh._probe.measure import Sleep
from asgi_token_refresh._probe.provider import Endpoints
from asgi_token_refresh._probe.rules import policy, recommend, settings
from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault, serve
from asgi_token_refresh.testing._http import ASGIApp, Receive, Scope, Send, lifespan, read_body

from .processes import ROOT, free_port
from .providers.node_oidc import NodeOIDCProvider, missing_runtime, running_node_oidc_provider

SECRET = "app-secret"


class Recorder:
    """An ASGI app behind a tap that remembers every secret it hands out: access, refresh and
    ID tokens, authorization codes. Tokens made outside HTTP are added with :meth:`collect`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.secrets: set[str] = {SECRET}

    def collect(self, body: Any) -> None:
        if isinstance(body, dict):
            self.secrets |= {
                v for k, v in body.items() if k.endswith("token") and isinstance(v, str)
            }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tap(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                for name, value in message["headers"]:
                    if name.lower() == b"location":
                        query = dict(parse_qsl(urlsplit(value.decode()).query))
                        self.secrets |= {query["code"]} if "code" in query else set()
            elif message["type"] == "http.response.body":
                with contextlib.suppress(ValueError):
                    self.collect(json.loads(message.get("body", b"") or b"null"))
            await send(message)

        await self.app(scope, receive, tap)


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Provider:
    url: str
    idp: FakeIdP
    recorder: Recorder
    clock: FakeClock
    caplog: pytest.LogCaptureFixture
    slept: list[float] = field(default_factory=list)

    def issue(self) -> str:
        tokens = self.idp.issue()
        self.recorder.collect(tokens)
        return str(tokens["refresh_token"])

    def probe(
        self, *argv: str, grants: int = 1, secret: str = SECRET, tokens: list[str] | None = None
    ) -> Run:
        """Run the command in-process on the provider's fake clock; every run is scanned."""
        given = tokens if tokens is not None else [self.issue() for _ in range(grants)]
        options = [arg for token in given for arg in ("--refresh-token", token)]
        argv = (
            "--issuer",
            self.url,
            "--client-id",
            "app",
            "--client-secret",
            secret,
            *options,
            *argv,
        )

        async def sleep(seconds: float) -> None:  # the provider's time moves; nobody waits
            self.slept.append(seconds)
            self.clock.advance(seconds)

        run = probe_cli(*argv, clock=self.clock, sleep=sleep)
        assert_no_secret(self.recorder, run.out, run.err, self.caplog.text)
        return run


def probe_cli(*argv: str, clock: FakeClock | None = None, sleep: Sleep | None = None) -> Run:
    """``probe ARGV`` in-process, its output captured."""
    parser = argparse.ArgumentParser(prog="probe")
    add_probe_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = run_probe(parser.parse_args(argv), clock=clock, sleep=sleep, stdout=out, stderr=err)
    return Run(code, out.getvalue(), err.getvalue())


def assert_no_secret(recorder: Recorder, *texts: str) -> None:
    assert len(recorder.secrets) > 1
    for secret in recorder.secrets:
        for text in texts:
            assert secret not in text


@contextlib.contextmanager
def provider(caplog: pytest.LogCaptureFixture, **options: Any) -> Iterator[Provider]:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    issuer = options.pop("issuer", None)
    port = options.pop("port", 0)
    idp = FakeIdP(issuer=issuer, clock=clock, **options)
    recorder = Recorder(idp)
    try:
        with serve(recorder, port=port) as url:
            yield Provider(issuer or url, idp, recorder, clock, caplog)
    finally:
        idp.close()


def rules(data: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in data["recommendations"]]


def flat(text: str) -> str:
    """Text with its line wrapping undone."""
    return " ".join(text.split())


def row(table: str, label: str) -> str:
    """The value of a table row (continuation lines joined)."""
    lines = table.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(label + "  "):
            value = [line[len(label) :].strip()]
            for more in lines[i + 1 :]:
                if not more.startswith(" " * 10):
                    break
                value.append(more.strip())
            return " ".join(value)
    raise AssertionError(f"no row {label!r} in\n{table}")


# -- each policy ------------------------------------------------------------------------------


def test_strict_provider_reuse_revokes_the_grant_and_a_lost_response_logs_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with provider(caplog) as p:
        run = p.probe()
        assert run.code == 0, run.err
        assert run.err.startswith("This probe spends the grant it probes")
        assert row(run.out, "OIDC discovery") == "found"
        assert (
            row(run.out, "RFC 8414 metadata") == "found at /.well-known/oauth-authorization-server"
        )
        assert (
            row(run.out, "endpoints")
            == "authorization, token, revocation, end_session, jwks, userinfo"
        )
        assert row(run.out, "rotation") == "on: each refresh returns a new refresh token"
        assert row(run.out, "access token expires_in") == "300 s (5 min)"
        assert row(run.out, "refresh token expires_in") == "not given"
        assert row(run.out, "ID token on refresh") == "yes"
        assert (
            row(run.out, "reuse of a consumed refresh token") == "refused at once: no grace window"
        )
        assert row(run.out, "reuse revokes the family") == "yes, the newest refresh token too"
        assert row(run.out, "dead refresh token") == "HTTP 400 invalid_grant (for a reused one)"
        assert row(run.out, "old access token after a refresh").startswith("still works")
        assert row(run.out, "revocation") == "supported (revoke answered 200)"
        assert row(run.out, "coordinator (more than one worker)") == "required"
        assert row(run.out, "a lost refresh response") == "logs the user out"
        assert (
            "- Reuse revokes the grant and there is no grace window: a lost refresh response logs "
            "the user out. Turn on your provider's reuse interval if it has one; use a coordinator"
        ) in flat(run.out)
        # refresh, refresh, reuse (refused: the grant dies), the newest (refused); no sleep.
        assert p.idp.token_calls("refresh_token") == 4
        assert p.idp.token_calls(outcome="reuse_revoked") == 1
        assert p.idp.grants_revoked == 1
        assert p.idp.calls("revoke") == 1
        assert p.slept == []

        data = p.probe("--json").json()
    assert data["schema"] == 1
    assert data["policy"] == "strict"
    assert data["rotation"] is True
    assert data["discovery"]["oidc"] is True
    assert data["discovery"]["revocation_published_in"] == "oidc"
    assert data["access_token_expires_in"] == 300
    assert data["refresh_token_expires_in"] is None
    assert data["id_token_on_refresh"] is True
    assert data["reuse"]["policy"] == "refused"
    assert data["reuse"]["accepted"] == 0
    assert data["reuse"]["revokes_family"] is True
    assert data["dead_refresh_token"] == {
        "status": 400, "error": "invalid_grant", "of": "reused", "terminal": True
    }  # fmt: skip
    assert data["old_access_token_after_refresh"] == "works"
    assert data["revocation"] == {"result": "supported", "status": 200, "supported": True}
    assert data["grant_left_alive"] is False
    assert data["settings"] == {
        "coordinator": "required", "grace_ttl_s": 60.0, "skew_s": 60.0,
        "lost_response": "logs the user out",
    }  # fmt: skip
    assert rules(data) == ["strict"]


def test_a_grace_window_is_bracketed_by_a_doubling_search_on_the_providers_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with provider(caplog, reuse_grace=30.0) as p:
        run = p.probe()
        data = p.probe("--json").json()
    assert run.code == 0, run.err
    assert row(run.out, "reuse of a consumed refresh token") == (
        "accepted 16 s after the rotation, refused at 32 s: a grace window between the two"
    )
    assert row(run.out, "answer to an accepted reuse") == (
        "the newest refresh token, with a new access token"
    )
    assert row(run.out, "reuse revokes the family") == "yes, the newest refresh token too"
    assert row(run.out, "coordinator (more than one worker)") == "recommended"
    assert row(run.out, "a lost refresh response") == "costs nothing if retried within 16 s"
    assert "for at least 16 s and less than 32 s after the rotation (a grace window)" in flat(
        run.out
    )
    assert "Search bound: the consumed refresh token was reused 5 times at once" in flat(run.out)
    assert sum(p.slept) == 2 * 32  # two runs, each up to the first refusal at 32 s
    reuse = data["reuse"]
    assert (reuse["policy"], reuse["accepted_until_s"], reuse["refused_at_s"]) == ("window", 16, 32)
    assert reuse["accepted"] == 5 + 5  # at once, then 1, 2, 4, 8 and 16 s after
    assert data["search"]["waits_s"] == [1, 2, 4, 8, 16, 32, 60]
    assert rules(data) == ["window"]


def test_further_grants_narrow_the_grace_window_to_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with provider(caplog, reuse_grace=30.0) as p:
        data = p.probe("--json", grants=3).json()
        assert p.idp.grants_revoked == 3  # every grant spent
    assert (data["reuse"]["accepted_until_s"], data["reuse"]["refused_at_s"]) == (29, 30)
    assert data["reuse"]["grants_used"] == data["grants_spent"] == 3


def test_further_grants_the_search_does_not_need_are_revoked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with provider(caplog) as p:  # strict: nothing to narrow
        run = p.probe("--json", grants=3)
        assert p.idp.calls("revoke") == 3
        assert p.idp.grants_revoked == 3
    assert run.json()["grants_spent"] == 1
    assert "revoking the 2 further grant(s) the search did not need" in run.err


def test_a_window_longer_than_max_grace_is_reported_as_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with provider(caplog, reuse_grace=30.0) as p:
        run = p.probe("--max-grace", "5")
        data = p.probe("--json", "--max-grace", "5").json()
        assert p.idp.token_calls(outcome="reuse_revoked") == 0  # never refused: /revoke ends it
    assert run.code == 0, run.err
    assert row(run.out, "reuse of a consumed refresh token") == (
        "still accepted 5 s after the rotation (the bound)"
    )
    assert row(run.out, "reuse revokes the family") == "unknown: reuse was never refused"
    assert data["policy"] == "unbounded"
    assert data["reuse"]["revokes_family"] is None
    assert data["search"]["waits_s"] == [1, 2, 4, 5]
    assert data["dead_refresh_token"]["of"] == "revoked"
    assert rules(data) == ["unbounded"]


def test_a_reuse_count_shows_in_the_reuses_at_once(caplog: pytest.LogCaptureFixture) -> None:
    with provider(caplog, reuse_count=2) as p:
        run = p.probe()
        data = p.probe("--json").json()
        assert p.slept == []
    assert row(run.out, "reuse of a consumed refresh token") == (
        "accepted 2 time(s) at once, then refused: a reuse count"
    )
    assert row(run.out, "a lost refresh response") == "costs nothing for up to 2 retries"
    assert (data["policy"], data["reuse"]["count"], data["reuse"]["accepted"]) == ("count", 2, 2)
    assert data["reuse"]["revokes_family"] is True
    assert data["settings"]["coordinator"] == "required"
    assert rules(data) == ["count"]


def test_dead_tokens_answered_403_are_reported_and_still_terminal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with provider(caplog, dead_token_status=403) as p:
        run = p.probe()
        data = p.probe("--json").json()
    assert row(run.out, "dead refresh token") == "HTTP 403 invalid_grant (for a reused one)"
    assert "the library decides on the error, not the status. Nothing to do." in flat(run.out)
    assert data["dead_refresh_token"] == {
        "status": 403, "error": "invalid_grant", "of": "reused", "terminal": True
    }  # fmt: skip
    assert rules(data) == ["strict", "dead_token_status"]


def test_without_rotation_reuse_does_not_apply_and_revocation_shows_the_dead_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with provider(caplog, rotate_refresh_tokens=False) as p:
        run = p.probe()
        data = p.probe("--json").json()
    assert row(run.out, "rotation") == "off"
    assert row(run.out, "reuse of a consumed refresh token") == "not applicable (no rotation)"
    assert row(run.out, "dead refresh token") == "HTTP 400 invalid_grant (for a revoked one)"
    assert row(run.out, "coordinator (more than one worker)") == "optional"
    assert row(run.out, "a lost refresh response") == "costs nothing"
    assert "Search" not in run.out
    assert (data["policy"], data["rotation"], data["reuse"]) == ("no_rotation", False, None)
    assert data["revocation"]["supported"] is True
    assert rules(data) == ["no_rotation"]


def test_a_refused_reuse_that_spares_the_grant(caplog: pytest.LogCaptureFixture) -> None:
    with provider(caplog, revoke_on_reuse=False) as p:
        run = p.probe()
        data = p.probe("--json").json()
    assert row(run.out, "reuse revokes the family") == "no, the newest refresh token still works"
    assert data["policy"] == "refused_grant_survives"
    assert data["grant_left_alive"] is False  # revoked at the end
    assert data["revocation"]["supported"] is True
    assert data["settings"]["lost_response"] == "logs the user out"
    assert rules(data) == ["refused_grant_survives"]


def test_an_issuer_with_a_path_and_revocation_only_in_rfc8414_metadata(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/realms/demo"
    options = {"issuer": issuer, "port": port, "revocation_in_oauth_metadata_only": True}
    with provider(caplog, **options) as p:
        run = p.probe()
        data = p.probe("--json").json()
    assert row(run.out, "RFC 8414 metadata") == (
        "found at /.well-known/oauth-authorization-server/realms/demo"
    )
    assert data["discovery"]["revocation_published_in"] == "rfc8414"
    assert data["discovery"]["endpoints"]["revocation"] == f"{issuer}/revoke"
    assert data["revocation"]["supported"] is True
    assert rules(data) == ["strict", "revocation_in_rfc8414_only"]


def test_the_command_is_registered_and_reads_the_secret_from_the_environment(
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASGI_TOKEN_REFRESH_CLIENT_SECRET", SECRET)
    with provider(caplog) as p:
        token = p.issue()
        argv = ["probe", "--issuer", p.url, "--client-id", "app", "--refresh-token", token]
        assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["policy"] == "strict"
    assert_no_secret(p.recorder, captured.out, captured.err, caplog.text)


def test_the_readme_shows_a_real_run_against_the_strict_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    readme = (ROOT / "README.md").read_text()
    after = readme.split("A run against `FakeIdP`'s strict policy", 1)[1]
    shown = after.split("```\n", 2)[1]
    with provider(caplog) as p:
        run = p.probe()
    assert run.out.replace(p.url, "http://127.0.0.1:8400") == shown


# -- errors -----------------------------------------------------------------------------------


def test_an_unreachable_provider_exits_1_with_one_line(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    argv = ["probe", "--issuer", f"http://127.0.0.1:{port}", "--client-id", "app"]
    assert main([*argv, "--refresh-token", "rt-unused"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"asgi-token-refresh probe: the provider is unreachable (metadata "
        f"http://127.0.0.1:{port}/.well-known/openid-configuration: network_error: ConnectError)"
    )


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.unavailable(), "the provider failed the first refresh (HTTP 503 invalid_response)"),
        (Fault.malformed(), "the token endpoint answered HTTP 200 with no valid token response"),
    ],
)
def test_a_misbehaving_provider_exits_1(
    caplog: pytest.LogCaptureFixture, fault: Fault, message: str
) -> None:
    with provider(caplog) as p:
        p.idp.script(fault)
        run = p.probe()
    assert run.code == 1
    assert run.out == ""
    assert run.err.splitlines()[-1] == f"asgi-token-refresh probe: {message}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-grace", "0"], "argument --max-grace: must be between 0 and 86400 seconds"),
        (["--redirect-port", "70000"], "argument --redirect-port: must be 0 (any free port)"),
        (["--client-id"], "argument --client-id: expected one argument"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["probe", "--issuer", "https://idp.example", "--client-id", "app", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--issuer", "ftp://idp.example"], "--issuer must be an http(s) URL, not 'ftp://idp.exa"),
        (["--issuer", "http://idp.example"], "--issuer must be https (plain http only on loopback"),
        (["--auth-method", "client_secret_post"], "client_secret_post needs --client-secret"),
        (["--refresh-token", " "], "--refresh-token is empty"),
    ],
)  # fmt: skip
def test_configuration_errors_exit_2_before_any_request(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["probe", "--issuer", "https://idp.example", "--client-id", "app"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err


def test_an_issuer_without_metadata_or_naming_another_issuer_exits_2(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with provider(caplog) as p:
        lost = probe_cli("--issuer", p.url + "/wrong", "--client-id", "app", "--refresh-token", "x")
    assert lost.code == 2
    assert lost.err.splitlines()[-1] == (
        f"asgi-token-refresh probe: no metadata at {p.url}/wrong: neither "
        "/.well-known/openid-configuration nor /.well-known/oauth-authorization-server answered "
        "(is --issuer the provider's issuer, path included?)"
    )
    with provider(caplog, issuer="https://idp.test") as p, serve(p.idp) as url:
        other = probe_cli("--issuer", url, "--client-id", "app", "--refresh-token", "x")
    assert other.code == 2
    assert other.err.splitlines()[-1] == (
        f"asgi-token-refresh probe: discovery document names issuer 'https://idp.test', "
        f"expected '{url}'"
    )


def test_a_refused_client_exits_2(caplog: pytest.LogCaptureFixture) -> None:
    with provider(caplog) as p:
        run = p.probe(secret="wrong")
    assert run.code == 2
    assert run.err.splitlines()[-1] == (
        "asgi-token-refresh probe: the provider refused the client (HTTP 401 invalid_client): "
        "check --client-id, --client-secret and --auth-method"
    )


def test_a_spent_refresh_token_exits_2(caplog: pytest.LogCaptureFixture) -> None:
    with provider(caplog) as p:
        token = p.issue()
        form = {"grant_type": "refresh_token", "refresh_token": token}
        httpx.post(f"{p.url}/token", data=form, auth=("app", SECRET)).raise_for_status()
        run = p.probe(tokens=[token])
    assert run.code == 2
    assert run.err.splitlines()[-1] == (
        "asgi-token-refresh probe: the provider refused the refresh token (HTTP 400 "
        "invalid_grant): it is spent, expired or revoked; log in again for a fresh one"
    )


# -- the browser login --------------------------------------------------------------------------


@contextlib.contextmanager
def probe_process(url: str, *argv: str) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """``python -m asgi_token_refresh probe`` logging in; yields it, the printed URL and what
    it printed on stderr until then."""
    command = [sys.executable, "-m", "asgi_token_refresh", "probe", "--issuer", url]
    command += ["--client-id", "app", "--client-secret", SECRET, "--redirect-port", "0", *argv]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith("    http"):
                break
        else:
            raise AssertionError("no authorization URL printed:\n" + "".join(lines))
        yield process, line.strip(), "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_browser_login_through_the_loopback_redirect(caplog: pytest.LogCaptureFixture) -> None:
    with provider(caplog) as p, probe_process(p.url, "--json") as (process, url, head):
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        assert url.startswith(f"{p.url}/authorize?")
        assert query["scope"] == "openid offline_access"
        assert query["prompt"] == "consent"
        assert query["code_challenge_method"] == "S256"
        assert {"state", "nonce", "code_challenge"} <= set(query)
        callback = query["redirect_uri"]
        assert callback.startswith("http://127.0.0.1:")
        assert callback.endswith("/callback")
        # Not the probe's login: refused, and the probe keeps waiting.
        assert httpx.get(callback, params={"state": "forged", "code": "x"}).status_code == 400
        assert httpx.get(callback.replace("/callback", "/favicon.ico")).status_code == 404
        # The browser: the provider auto-approves and redirects back to the probe.
        page = httpx.get(url, follow_redirects=True)
        assert page.status_code == 200
        assert "Login received" in page.text
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert p.idp.calls("authorize") == 1
        assert p.idp.token_calls("authorization_code") == 1
    data = json.loads(out)
    assert data["policy"] == "strict"
    assert head.startswith("This probe spends the grant it probes")
    assert_no_secret(p.recorder, out, head, err)  # (caplog holds the test browser's requests)


def test_a_login_refused_for_offline_access_says_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with provider(caplog) as p, probe_process(p.url) as (process, url, _):
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        refused = {"state": query["state"], "error": "invalid_scope", "error_description": "no"}
        assert httpx.get(query["redirect_uri"], params=refused).status_code == 200
        out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert out == ""
    assert err.splitlines()[-1] == (
        "asgi-token-refresh probe: the provider refused the login (invalid_scope): the client "
        "may not ask for offline_access (allow it, with the refresh_token grant, in the "
        "provider's client settings)"
    )


def test_a_login_that_never_comes_back_exits_2(caplog: pytest.LogCaptureFixture) -> None:
    with provider(caplog) as p:
        argv = ["--issuer", p.url, "--client-id", "app", "--redirect-port", "0"]
        run = probe_cli(*argv, "--login-timeout", "0.2")
    assert run.code == 2
    assert "no login came back to http://127.0.0.1:" in run.err.splitlines()[-1]


def test_a_redirect_port_in_use_exits_2(caplog: pytest.LogCaptureFixture) -> None:
    with provider(caplog) as p, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        run = probe_cli("--issuer", p.url, "--client-id", "app", "--redirect-port", port)
    assert run.code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in run.err


# -- against node oidc-provider (tests/providers/node_oidc.py) -------------------------------------

needs_node = pytest.mark.skipif(missing_runtime() is not None, reason=missing_runtime() or "")
REAL_TTL = 300


def forward_to(origin: str) -> ASGIApp:
    """A reverse proxy to ``origin``: the recorder sits in front of the real provider."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"host", b"connection")]
        url = origin + scope["raw_path"].decode() + "?" * bool(scope["query_string"])
        url += scope["query_string"].decode()
        async with httpx.AsyncClient(timeout=10.0) as client:
            answer = await client.request(scope["method"], url, headers=headers, content=body)
        skip = {b"content-length", b"content-encoding", b"transfer-encoding", b"connection"}
        out = [(k, v) for k, v in answer.headers.raw if k.lower() not in skip]
        out.append((b"content-length", str(len(answer.content)).encode()))
        await send({"type": "http.response.start", "status": answer.status_code, "headers": out})
        await send({"type": "http.response.body", "body": answer.content})

    return app


@dataclass
class RealProvider:
    op: NodeOIDCProvider
    recorder: Recorder

    def log_in(self, subject: str) -> str:
        tokens = self.op.log_in(subject)
        self.recorder.collect(tokens)
        return str(tokens["refresh_token"])

    def argv(self) -> list[str]:
        op = self.op
        return ["--issuer", op.issuer, "--client-id", op.client_id, "--client-secret", SECRET]


@contextlib.contextmanager
def real_provider(workdir: Path, *, rotate: bool = True) -> Iterator[RealProvider]:
    """node oidc-provider, its issuer on a port where the recorder forwards to it."""
    issuer_port = free_port()
    with running_node_oidc_provider(
        workdir,
        # A native client: a loopback redirect matches on any port (RFC 8252 §7.3), as the
        # probe's login picks its port when it runs (--redirect-port 0).
        redirect_uris=["http://127.0.0.1/callback"],
        application_type="native",
        access_token_ttl=REAL_TTL,
        rotate_refresh_tokens=rotate,
        issuer_port=issuer_port,
        client_secret=SECRET,
    ) as op:
        parts = urlsplit(op.url)
        recorder = Recorder(forward_to(f"{parts.scheme}://{parts.netloc}"))
        with serve(recorder, port=issuer_port):
            yield RealProvider(op, recorder)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealProvider]:
    with real_provider(tmp_path_factory.mktemp("node-oidc")) as provider:
        yield provider


@needs_node
def test_node_oidc_provider_is_strict_reuse_revokes_the_grant(
    node: RealProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    before = node.op.counts()
    run = probe_cli(*node.argv(), "--refresh-token", node.log_in("probe-table"))
    data = probe_cli(*node.argv(), "--refresh-token", node.log_in("probe-json"), "--json").json()
    after = node.op.counts()
    assert run.code == 0, run.err
    assert row(run.out, "provider") == f"{node.op.issuer} (client app)"
    assert row(run.out, "OIDC discovery") == "found"
    assert row(run.out, "RFC 8414 metadata") == "not found"
    assert (
        row(run.out, "endpoints") == "authorization, token, revocation, end_session, jwks, userinfo"
    )
    assert row(run.out, "rotation") == "on: each refresh returns a new refresh token"
    assert row(run.out, "access token expires_in") == "300 s (5 min)"
    assert row(run.out, "refresh token expires_in") == "not given"
    assert row(run.out, "ID token on refresh") == "yes"
    assert row(run.out, "reuse of a consumed refresh token") == "refused at once: no grace window"
    assert row(run.out, "reuse revokes the family") == "yes, the newest refresh token too"
    assert row(run.out, "dead refresh token") == "HTTP 400 invalid_grant (for a reused one)"
    assert row(run.out, "old access token after a refresh") == (
        "still works (userinfo answered 200 after the next refresh)"
    )
    assert row(run.out, "revocation") == "supported (revoke answered 200)"
    assert row(run.out, "a lost refresh response") == "logs the user out"
    assert (data["policy"], data["discovery"]["rfc8414"]) == ("strict", False)
    assert data["discovery"]["revocation_published_in"] == "oidc"
    assert rules(data) == ["strict"]
    # The provider's own counts, for the two probes: per grant, two refreshes, the reuse and
    # the newest token refused (the grant revoked by the reuse), one revocation.
    assert (
        after.token_calls("refresh_token", "success")
        - before.token_calls("refresh_token", "success")
        == 4
    )
    assert (
        after.token_calls("refresh_token", "invalid_grant")
        - before.token_calls("refresh_token", "invalid_grant")
        == 4
    )
    assert after.grants_revoked - before.grants_revoked == 2
    assert after.requests("revocation", 200) - before.requests("revocation", 200) == 2
    assert {(e.status, e.error) for e in after.token_errors[-4:]} == {(400, "invalid_grant")}
    assert_no_secret(node.recorder, run.out, run.err, json.dumps(data), caplog.text)


@needs_node
def test_probe_logs_in_through_node_oidc_providers_own_forms(node: RealProvider) -> None:
    before = node.op.counts()
    with probe_process(node.op.issuer, "--json") as (process, url, head):

        async def browse() -> httpx.Response:
            async with httpx.AsyncClient(timeout=10.0) as browser:
                page = await browser.get(url, follow_redirects=True)
                return await node.op.through_forms(browser, page, login="probe-browser")

        page = asyncio.run(browse())
        assert page.status_code == 200
        assert "Login received" in page.text
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    data = json.loads(out)
    assert data["policy"] == "strict"
    after = node.op.counts()
    codes = after.token_calls("authorization_code", "success")
    assert codes - before.token_calls("authorization_code", "success") == 1
    assert_no_secret(node.recorder, out, head, err)


@needs_node
def test_node_oidc_provider_without_rotation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with real_provider(tmp_path, rotate=False) as provider:
        data = probe_cli(*provider.argv(), "--refresh-token", provider.log_in("probe"), "--json")
        assert data.code == 0, data.err
        counts = provider.op.counts()
    found = data.json()
    assert (found["policy"], found["reuse"]) == ("no_rotation", None)
    assert found["dead_refresh_token"] == {
        "status": 400, "error": "invalid_grant", "of": "revoked", "terminal": True
    }  # fmt: skip
    assert found["revocation"]["supported"] is True
    assert counts.grants_revoked == 1
    assert_no_secret(provider.recorder, data.out, data.err, caplog.text)


# -- the rules, for what FakeIdP does not model ---------------------------------------------------


def findings(**changes: Any) -> Findings:
    """A strict provider's findings, changed."""
    endpoints = Endpoints(oidc=True, rfc8414_url="https://idp.example/.well-known/x")
    endpoints.urls = {name: f"https://idp.example/{name}" for name in endpoints.urls}
    endpoints.revocation_in = "oidc"
    base = Findings(
        "https://idp.example", "app", endpoints, SearchBounds(),
        rotation=True, access_expires_in=300.0, id_token_on_refresh=True,
        reuse=Reuse("refused", refused_at=0.0, revokes_family=True),
        dead=Refusal(400, "invalid_grant", "reused"),
        old_access_token="works", revocation="supported", revocation_status=200,
    )  # fmt: skip
    return replace(base, **changes)


def window(**changes: Any) -> Reuse:
    base = Reuse("window", accepted=10, accepted_until=16.0, refused_at=32.0, revokes_family=True)
    return replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "expected", "words"),
    [
        ({}, ["strict"], "a lost refresh response logs the user out"),
        ({"reuse": window(answer="same", fresh_expires_in=True)},
         ["window", "replay_original_access_token"], "Keep skew at least the window (60 s)"),
        ({"reuse": window(accepted_until=64.0, refused_at=128.0, answer="same",
                          fresh_expires_in=True)},
         ["window", "replay_original_access_token"], "Keep skew at least the window (128 s)"),
        ({"reuse": window(answer="same")}, ["window", "replay_same_tokens"], "converge"),
        ({"reuse": window(answer="new")}, ["window", "replay_new_branch"], "two branches"),
        ({"reuse": window(accepted_until=2.0, refused_at=4.0)}, ["window"],
         "shorter than the retry delay (5 s)"),
        ({"old_access_token": "refused"}, ["strict", "previous_access_token_revoked"],
         "a 401 makes one compare-and-refresh with the failed token"),
        ({"old_access_token": "unknown", "old_access_detail": "no userinfo endpoint published"},
         ["strict", "previous_access_token_unknown"], "(no userinfo endpoint published)"),
        ({"dead": Refusal(400, "invalid_request", "reused")}, ["strict", "dead_token_not_terminal"],
         "the library treats that as transient"),
        ({"access_expires_in": None}, ["strict", "no_expires_in"], "default_token_lifetime"),
        ({"access_expires_in": 60.0}, ["strict", "short_access_tokens"], "refreshed 30 s before"),
        ({"refresh_expires_in": 2592000.0}, ["strict", "refresh_token_lifetime"],
         "expire 2592000 s (30 d) after issue"),
        ({"revocation": "not_published", "revocation_status": None, "grant_left_alive": True},
         ["strict", "revocation_missing"], "The probed grant is still alive"),
        ({"revocation": "failed", "revocation_status": 404}, ["strict", "revocation_failed"],
         "answered HTTP 404"),
        ({"revocation": "ineffective"}, ["strict", "revocation_ineffective"], "kept working"),
    ],
)  # fmt: skip
def test_recommendations_follow_from_the_findings(
    changes: dict[str, Any], expected: list[str], words: str
) -> None:
    result = recommend(findings(**changes))
    assert [r.rule for r in result] == expected
    assert words in " ".join(r.text for r in result)


def test_metadata_rules() -> None:
    no_oidc = findings()
    no_oidc.endpoints.oidc = False
    assert [r.rule for r in recommend(no_oidc)] == ["strict", "no_oidc_discovery"]
    odd = findings()
    odd.endpoints.urls["end_session"] = None
    odd.endpoints.rfc8414_compliant = False
    assert [r.rule for r in recommend(odd)][1:] == ["no_end_session", "rfc8414_under_issuer_path"]


def test_settings_per_policy() -> None:
    cases = {
        "strict": findings(),
        "refused_grant_survives": findings(reuse=Reuse("refused", revokes_family=False)),
        "count": findings(reuse=Reuse("count", accepted=3, count=3, revokes_family=True)),
        "window": findings(reuse=window()),
        "unbounded": findings(reuse=Reuse("unbounded", accepted=12, accepted_until=60.0)),
        "no_rotation": findings(rotation=False, reuse=None),
    }
    chosen = {name: settings(f) for name, f in cases.items()}
    assert {name: policy(f) for name, f in cases.items()} == {name: name for name in cases}
    assert {name: s.coordinator for name, s in chosen.items()} == {
        "strict": "required", "refused_grant_survives": "required", "count": "required",
        "window": "recommended", "unbounded": "optional", "no_rotation": "optional",
    }  # fmt: skip
    assert {name: s.lost_response for name, s in chosen.items()} == {
        "strict": "logs the user out",
        "refused_grant_survives": "logs the user out",
        "count": "costs nothing for up to 3 retries",
        "window": "costs nothing if retried within 16 s",
        "unbounded": "costs nothing",
        "no_rotation": "costs nothing",
    }
    assert {s.grace_ttl for s in chosen.values()} == {60.0}
