"""``asgi-token-refresh probe``: how an OAuth provider rotates refresh tokens, and what to
configure for it. It spends the grant it probes.

``command`` (options, exit codes, output) drives ``login`` (a loopback browser login for a
throwaway grant) and ``measure`` (the sequence that spends the grant) through ``provider``
(raw answers, every token redacted); ``findings`` holds what was found, ``rules`` what it
means and ``report`` shows it (a table, or JSON).
"""

from .command import add_probe_arguments, add_probe_command, run_probe

__all__ = ["add_probe_arguments", "add_probe_command", "run_probe"]
