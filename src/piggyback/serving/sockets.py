"""The server's listening sockets, bound before the model loads.

uvicorn binds its own sockets only once the app is built, i.e. after the model has loaded (minutes
when weights download): a taken port or a mistyped address then failed late, after a "serving on"
line, with uvicorn's traceback. Binding first names the problem at once, in one line. The sockets
are bound but not listening until the model is loaded (`listen_all`, just before uvicorn
serves), so until then clients are refused rather than left waiting in a backlog, and readiness
probes on the port stay honest. Every address the host resolves to is bound, as asyncio's own
`create_server(host=...)` does (`localhost` may be ::1 and 127.0.0.1).
"""

from __future__ import annotations

import socket

__all__ = ["bound_sockets", "close_all", "listen_all", "url_of"]


def bound_sockets(host: str, port: int) -> list[socket.socket]:
    """TCP sockets bound to every address of `host` ("" or "0.0.0.0": all interfaces) at
    `port`, or one ValueError saying what is wrong and what to do."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0-65535, got {port}")
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(f"--host {host!r} is not an address of this machine: {error}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in dict.fromkeys(found):
            if sockets:  # --port 0: every address on the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sockets.append(_bound(family, kind, protocol, address))
    except OSError as error:
        close_all(sockets)
        raise _cannot_listen(host, port, error) from None
    return sockets


def listen_all(sockets: list[socket.socket], host: str, port: int) -> None:
    """Start listening (once the model is loaded), or one ValueError: a program that bound the
    port meanwhile and listens on it first would otherwise leave this server up, saying it
    serves, with no socket (uvloop drops the failed listen silently)."""
    try:
        for sock in sockets:
            sock.listen(_BACKLOG)
    except OSError as error:
        raise _cannot_listen(host, port, error, " (taken while the model loaded)") from None


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


_BACKLOG = 2048  # uvicorn's default


def _cannot_listen(host: str, port: int, error: OSError, when: str = "") -> ValueError:
    reason = error.strerror or str(error)
    return ValueError(
        f"cannot listen on {host}:{port}: {reason}{when}; choose another --port or --host"
    )


def _bound(family: int, kind: int, protocol: int, address: tuple) -> socket.socket:
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio: IPv6 only, beside an IPv4 socket
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(host: str, sockets: list[socket.socket]) -> str:
    """The URL to print: the host as given (or the bound address), the port bound."""
    address, port = sockets[0].getsockname()[:2]
    name = host or address
    return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"
