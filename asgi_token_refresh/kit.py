"""The extension kit: everything a new session store or coordinator needs, public and typed.

The built-in memory, Redis and file backends use only these names; ``docs/extending.md``
walks through writing a new one (PostgreSQL, DynamoDB, ...).

Session stores
    A server-side store is a :class:`SessionBackend` (``get``, compare-and-set ``put``,
    ``delete`` by session id) wrapped in :class:`BackendSessionStore`, which owns the
    session-id cookie (:func:`new_session_id`, :class:`CookieWriter`, :func:`session_max_age`).
    Every write keeps :func:`supersedes`: a slower writer never moves a session back.

Coordinators
    A :class:`Coordinator` names grants with a keyed hash (:meth:`Sealer.name`), stores what a
    leader publishes with :func:`encode_outcome` / :func:`decode_outcome` (sealed and bound to
    its key), and hands out :class:`Lease` objects.

Both
    :class:`Sealer` encrypts (AES-GCM, key rotation) anything that leaves the process.
    :class:`PerLoop` keeps one connection pool per event loop; hooks are ordinary async code,
    called on the event loop of whoever uses them.
"""

from ._cookies import (
    DEFAULT_MAX_AGE,
    CookieWriter,
    SameSite,
    parse_cookie_header,
    session_max_age,
    validate_cookie_options,
)
from ._coordination import (
    Coordinator,
    Lease,
    LocalCoordinator,
    Published,
    decode_outcome,
    encode_outcome,
)
from ._per_loop import PerLoop
from ._sealing import Sealer
from ._sessions import (
    BackendSessionStore,
    ServerSideStore,
    Session,
    SessionBackend,
    SessionCookie,
    SessionStore,
    SizeLimitedStore,
    new_session_id,
    supersedes,
)

__all__ = [
    "DEFAULT_MAX_AGE",
    "BackendSessionStore",
    "CookieWriter",
    "Coordinator",
    "Lease",
    "LocalCoordinator",
    "PerLoop",
    "Published",
    "SameSite",
    "Sealer",
    "ServerSideStore",
    "Session",
    "SessionBackend",
    "SessionCookie",
    "SessionStore",
    "SizeLimitedStore",
    "decode_outcome",
    "encode_outcome",
    "new_session_id",
    "parse_cookie_header",
    "session_max_age",
    "supersedes",
    "validate_cookie_options",
]
