import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_client_credentials_example_makes_one_token_request_for_twenty_workers() -> None:
    env = {"PATH": "/usr/bin:/bin"}  # no OIDC_ISSUER: the in-process FakeIdP
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "client_credentials.py")],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    assert result.stdout.count("token expires at") == 20
    assert "provider token requests: 1 for 20 workers" in result.stdout
