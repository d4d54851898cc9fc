"""Serving the API with uvicorn on a thread of the intake service's process.

The socket is bound in `start()`, on the caller's thread, so a taken port fails
`ferry run intake` at once with the OS's message rather than in a thread nobody watches.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from shared.errors import ConfigurationError

log = logging.getLogger(__name__)


def parse_bind(bind: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port".

    Raises ConfigurationError for anything else.
    """
    host, _, port = bind.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(f"FERRY_INTAKE_BIND {bind!r} is not host:port")
    return host, int(port)


class ApiServer:
    """uvicorn on a daemon thread; `start()` returns once it accepts connections."""

    def __init__(self, app: FastAPI, bind: str, *, start_timeout: float = 15.0) -> None:
        self.host, self.port = parse_bind(bind)
        self._app = app
        self._start_timeout = start_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve. Raises OSError when the address cannot be bound, RuntimeError
        when uvicorn does not come up."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            raise OSError(error.errno, f"intake API cannot listen on {self.host}:{self.port}: "
                                       f"{error.strerror}") from error
        self.port = sock.getsockname()[1]  # the real one when asked for port 0
        # log_config=None: uvicorn's lines go through the root logger, in FERRY_LOG_FORMAT
        config = uvicorn.Config(self._app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5, log_config=None)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name="intake-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"intake API did not start on {self.url}")
            time.sleep(0.02)
        log.info("intake: API on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
