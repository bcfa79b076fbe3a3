"""``service.connections.Server`` in-process, on a free loopback port: the drain when another
worker shuts the listening socket they share."""

from __future__ import annotations

import socket
import threading
import urllib.request

import falcon

from service.config import Config
from service.connections import create_server


class Held:
    """Answers once the test lets it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.entered.set()
        self.release.wait(10)
        resp.media = {"status": "done"}


def test_a_socket_shut_by_another_worker_drains_this_one_after_its_requests():
    """Workers share one listening socket, and the first to drain shuts it for all: the others
    must finish their requests and then stop too, not lose their loop's upkeep (waitress closes a
    server whose socket hangs up, and then nothing would ever end the loop)."""
    held = Held()
    app = falcon.App()
    app.add_route("/held", held)
    server = create_server(app, Config(host="127.0.0.1", port=0, shutdown_grace_s=10))
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    answers: list[int] = []
    url = f"http://127.0.0.1:{server.effective_port}/held"
    client = threading.Thread(target=lambda: answers.append(urllib.request.urlopen(url, timeout=10).status))
    client.start()
    assert held.entered.wait(10)
    server.socket.shutdown(socket.SHUT_RD)  # what another worker's drain does to the shared socket
    held.release.set()
    client.join(10)
    assert answers == [200]
    loop.join(10)
    assert not loop.is_alive()  # drained and stopped on its own
