"""A TCP proxy on loopback between the services and a server (RabbitMQ, PostgreSQL) that a
test can cut, as a broken link would, and restore — never the machine's server itself.

`cut()` closes every open connection (both ends) and, until `restore()`, treats new ones
as a dead link would: `blackhole` accepts them and holds them silent (a client without a
timeout hangs there), `refuse` stops listening (connection refused). `restore()` closes the
held ones and forwards again, on the same port. `cut(seconds=…)` restores by itself after
that long: the outage's length is the proxy's, not the test's.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["blackhole", "refuse"]


@dataclass
class Outage:
    """What one cut did: how many open connections it closed, how many new ones it held
    or refused while it lasted."""

    closed: int = 0
    held: int = 0


@dataclass
class TcpProxy:
    upstream: tuple[str, int]
    mode: Mode = "blackhole"
    port: int = 0
    accepted: int = 0  # connections forwarded, over the proxy's life
    outages: list[Outage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._held: list[socket.socket] = []
        self._cut = False
        self._closed = False
        self._timer: threading.Timer | None = None
        self._listener = self._listen()
        self.port = self._listener.getsockname()[1]
        self._acceptor = self._start_acceptor()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        return listener

    def _start_acceptor(self) -> threading.Thread:
        thread = threading.Thread(target=self._accept, args=(self._listener,),
                                  name=f"proxy-{self.port}", daemon=True)
        thread.start()
        return thread

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed (refuse mode's cut, or close())
            with self._lock:
                if self._closed:
                    client.close()
                    return
                if self._cut:
                    self._held.append(client)  # silent: no byte ever comes back
                    self.outages[-1].held += 1
                    continue
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        with self._lock:
            if self._cut or self._closed:
                client.close()
                server.close()
                return
            self._open.update((client, server))
            self.accepted += 1
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True,
                             name=f"proxy-{self.port}-pump").start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                self._drop(end)

    def _drop(self, end: socket.socket) -> None:
        with self._lock:
            self._open.discard(end)
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv on it
        end.close()

    def cut(self, seconds: float | None = None) -> Outage:
        """Break the link: every open connection closed, new ones held (or refused) until
        restore() — called by a timer after `seconds` when given."""
        outage = Outage()
        with self._lock:
            self._cut = True
            self.outages.append(outage)
            doomed = list(self._open)
            outage.closed = len(doomed) // 2
        if self.mode == "refuse":
            self._stop_listening()
        for end in doomed:
            self._drop(end)
        if seconds is not None:
            self._timer = threading.Timer(seconds, self.restore)
            self._timer.daemon = True
            self._timer.start()
        return outage

    def restore(self) -> None:
        """Mend the link: the connections held during the cut are closed, new ones forwarded."""
        with self._lock:
            if not self._cut or self._closed:
                return
            held, self._held = self._held, []
            if self.mode == "refuse":
                self._listener = self._listen()
                self._acceptor = self._start_acceptor()
            self._cut = False
        for client in held:
            client.close()

    def wait_restored(self, timeout: float) -> bool:
        """Wait for a timed cut to end; True once restored."""
        if self._timer is not None:
            self._timer.join(timeout)
        return not self._cut

    def _stop_listening(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor's accept()
        self._listener.close()
        self._acceptor.join(timeout=5)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            doomed = [*self._open, *self._held]
            self._held = []
        if self._timer is not None:
            self._timer.cancel()
        self._stop_listening()
        for end in doomed:
            self._drop(end)
