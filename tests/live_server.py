"""A real uvicorn server on a free loopback port, in a thread, for tests that need real HTTP
(the openai client, a browser, dropped connections, slow sockets)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from gptkit.serve import ServeConfig
from gptkit.serve_guard import uvicorn_config


class LiveServer:
    """`with LiveServer(app) as url:` serves `app` at url (http://127.0.0.1:PORT), with the
    uvicorn settings `gptkit serve` uses for `config` (its timeouts, its h11 protocol)."""

    def __init__(self, app, config: ServeConfig | None = None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        settings = uvicorn_config(app, config or ServeConfig(), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(settings)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
