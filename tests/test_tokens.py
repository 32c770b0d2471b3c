import json
import os
import subprocess
import sys

import pytest

from asgi_token_refresh import OAuth2Client, Refresher, TokenEndpointError, TokenSet
from asgi_token_refresh.testing import FakeClock

NOW = 1_700_000_000.0


def parse(body: object, **options: object) -> TokenSet:
    raw = body if isinstance(body, bytes | str) else json.dumps(body)
    return TokenSet.from_token_response(
        raw,
        issued_at=NOW,
        default_lifetime=options.pop("default_lifetime", 3600.0),  # type: ignore[arg-type]
        previous=options.pop("previous", None),  # type: ignore[arg-type]
    )


def test_parses_an_rfc6749_token_response() -> None:
    ts = parse(
        {
            "access_token": "at",
            "refresh_token": "rt",
            "id_token": "idt",
            "token_type": "bearer",
            "expires_in": 300,
            "scope": "openid offline_access",
            "custom": 7,
        }
    )
    assert (ts.access_token, ts.refresh_token, ts.id_token) == ("at", "rt", "idt")
    assert ts.token_type == "Bearer"
    assert ts.expires_at == NOW + 300
    assert ts.lifetime == 300
    assert ts.scope == "openid offline_access"
    assert ts.extra == {"custom": 7}


def test_missing_expires_in_uses_the_default_lifetime() -> None:
    assert parse({"access_token": "at"}, default_lifetime=120.0).expires_at == NOW + 120


def test_numeric_string_expires_in_is_accepted() -> None:
    assert parse({"access_token": "at", "expires_in": "60"}).expires_at == NOW + 60


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ([1, 2], "not a JSON object"),
        ({"token_type": "Bearer"}, "no access_token"),
        ({"access_token": ""}, "no access_token"),
        ({"access_token": 5}, "no access_token"),
        ({"access_token": "at", "expires_in": "soon"}, "not a number"),
        ({"access_token": "at", "expires_in": True}, "not a number"),
        ({"access_token": "at", "expires_in": [1]}, "not a number"),
        ({"access_token": "at", "expires_in": -5}, "non-negative"),
        ({"access_token": "at", "expires_in": "nan"}, "non-negative"),
        ({"access_token": "at", "refresh_token": 12}, "refresh_token is not a string"),
    ],
)
def test_garbage_responses_raise_a_clear_error(body: object, complaint: str) -> None:
    with pytest.raises(TokenEndpointError) as caught:
        parse(body)
    assert caught.value.error == "invalid_response"
    assert complaint in str(caught.value)


def test_a_provider_that_does_not_rotate_keeps_the_old_refresh_token() -> None:
    old = parse({"access_token": "at1", "refresh_token": "rt", "id_token": "id1", "scope": "s"})
    new = parse({"access_token": "at2"}, previous=old)
    assert (new.access_token, new.refresh_token, new.id_token, new.scope) == (
        "at2",
        "rt",
        "id1",
        "s",
    )


def test_a_rotated_refresh_token_replaces_the_old_one() -> None:
    old = parse({"access_token": "at1", "refresh_token": "rt1"})
    assert (
        parse({"access_token": "at2", "refresh_token": "rt2"}, previous=old).refresh_token == "rt2"
    )


@pytest.mark.parametrize(
    ("lifetime", "skew", "due_from"),
    [
        (300.0, 60.0, 240.0),  # skew applies as is
        (90.0, 60.0, 45.0),  # clamped to half the lifetime
        (300.0, 0.0, 300.0),  # no skew: due exactly at expiry
    ],
)
def test_refresh_is_due_exactly_from_expiry_minus_clamped_skew(
    lifetime: float, skew: float, due_from: float
) -> None:
    ts = parse({"access_token": "at", "expires_in": lifetime})

    def due_at(now: float) -> bool:
        client = OAuth2Client(
            client_id="app", client_secret="s", token_endpoint="https://idp.test/token"
        )
        return Refresher(client, skew=skew, jitter=0, clock=FakeClock(now)).refresh_due(ts)

    assert not due_at(NOW + due_from - 0.001)
    assert due_at(NOW + due_from)
    assert due_at(NOW + lifetime + 10)


def test_the_jitter_share_is_the_same_in_every_process_and_spreads_sessions() -> None:
    """Python's hash() is salted per process; the jitter must not be, or workers would
    disagree on when one session is due."""
    code = (
        "from asgi_token_refresh import TokenSet;"
        "print(TokenSet('at', 2e9, 1e9, refresh_token='rt-of-one-session').jitter_fraction)"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(seen) == 1
    fractions = [
        TokenSet("at", 2e9, 1e9, refresh_token=f"rt-{i}").jitter_fraction for i in range(1000)
    ]
    assert all(0 <= f < 1 for f in fractions)
    assert min(fractions) < 0.01
    assert max(fractions) > 0.99


def test_round_trips_through_a_dict() -> None:
    ts = parse({"access_token": "at", "refresh_token": "rt", "expires_in": 5, "x": [1]})
    assert TokenSet.from_dict(json.loads(json.dumps(ts.to_dict()))) == ts


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"access_token": "at", "expires_at": "x", "issued_at": 1},
        {"access_token": 1, "expires_at": 1, "issued_at": 1},
        {"access_token": "at", "expires_at": 1, "issued_at": 1, "refresh_token": 3},
        {"access_token": "at", "expires_at": "inf", "issued_at": 1},
        {"access_token": "at", "expires_at": 1, "issued_at": 1, "extra": []},
    ],
)
def test_from_dict_rejects_malformed_mappings(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not a serialised TokenSet"):
        TokenSet.from_dict(data)


def test_repr_names_present_tokens_but_never_their_values() -> None:
    ts = parse({"access_token": "AT-SECRET", "refresh_token": "RT-SECRET", "id_token": "ID-SECRET"})
    text = repr(ts) + str(ts)
    assert "refresh_token" in text
    assert "SECRET" not in text
