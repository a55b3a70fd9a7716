"""The checks before serving: who may reach the server, and how.

Binding anything but loopback needs a bearer token, which then guards every endpoint, and TLS (or
``insecure=True``, said out loud); a token must be one a client can send. On a loopback bind only
loopback Host names are accepted (DNS rebinding). Each refusal is a :class:`~edgeopt.serve.ServeError`
with one line, before the model loads.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import List, Optional

from edgeopt.agent import MIN_TOKEN_CHARS
from edgeopt.serve import ServeError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: Optional[str]) -> None:
    """Refuse a token that could never match what a client sends (HTTP strips the spaces around a header
    value and carries non-ASCII text as Latin-1) or that is too short to guess."""
    if token is None:
        return
    if token != token.strip():
        raise ServeError("the token starts or ends with whitespace, which HTTP strips from the header: remove it")
    if not (token.isascii() and token.isprintable()):
        raise ServeError("the token must be printable ASCII (letters, digits, punctuation): HTTP headers carry "
                         "nothing else reliably")
    if len(token) < MIN_TOKEN_CHARS:
        raise ServeError(f"the token must be at least {MIN_TOKEN_CHARS} characters")


def check_bind(host: str, token: Optional[str], *, tls: bool = False, insecure: bool = False) -> None:
    """Refuse a bad token, any non-loopback address without a token, and a token sent off loopback in
    clear text (no TLS) unless ``insecure``."""
    check_token(token)
    if is_loopback(host):
        return
    if token is None:
        raise ServeError(f"refusing to serve on {host} (not loopback) without a token: set EDGEOPT_SERVE_TOKEN "
                         f"or pass --token, or bind 127.0.0.1")
    if not tls and not insecure:
        raise ServeError(f"refusing to send the token in clear text on {host} (not loopback): pass --ssl-certfile "
                         f"and --ssl-keyfile, or --insecure behind a TLS proxy you trust")


def allowed_hosts(host: str) -> Optional[List[str]]:
    """The Host header values a server bound to ``host`` accepts: loopback names on a loopback bind (a
    DNS-rebinding page sends its own name), None (any) otherwise."""
    if not is_loopback(host):
        return None
    bare = host.strip("[]")
    own = f"[{bare}]" if ":" in bare else bare
    return list(dict.fromkeys((*LOOPBACK_NAMES, own.lower())))


def check_tls(certfile: Optional[Path], keyfile: Optional[Path]) -> None:
    """Load the certificate and key once now, so that a bad pair fails in one line before the model loads."""
    if keyfile is not None and certfile is None:
        raise ServeError("--ssl-keyfile needs --ssl-certfile")
    if certfile is None:
        return
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is not None and not Path(path).is_file():
            raise ServeError(f"{flag} {path}: cannot load: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as err:
        what = f"--ssl-certfile {certfile}" + (f" / --ssl-keyfile {keyfile}" if keyfile else "")
        raise ServeError(f"{what}: cannot load the certificate and key ({err.strerror or err})") from None
