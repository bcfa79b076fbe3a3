"""A ``service.connections`` server in this process, on a free loopback port, and small apps
for it: what the tests of connections and uploads share."""

from __future__ import annotations

import socket
import threading

import falcon

from service.connections import Server


def app_with(routes: dict[str, object]) -> falcon.App:
    """A Falcon app serving each resource at its path."""
    app = falcon.App()
    for path, resource in routes.items():
        app.add_route(path, resource)
    return app


def started(server: Server) -> threading.Thread:
    """The server's loop, running in a thread: joining it tells that the server stopped."""
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    return loop


class Echo:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"received": len(req.bounded_stream.read())}


class Long:
    """An answer longer than waitress buffers before its task waits for the client to read (by
    default), or one of ``size`` bytes."""

    def __init__(self, size: int = 40 << 20) -> None:
        self.size = size
        self.answered = 0

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = b"x" * self.size
        self.answered += 1


def read_all(client: socket.socket) -> bytes:
    answer = b""
    while part := client.recv(65536):
        answer += part
    return answer
