import ast
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


def test_no_example_imports_a_private_module_of_the_library() -> None:
    private = []
    for path in sorted(EXAMPLES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in modules:
                package, *names = module.split(".")
                if package == "asgi_token_refresh" and any(_private(name) for name in names):
                    private.append(f"{path.name}:{node.lineno} {module}")
    assert private == []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")  # not __version__
