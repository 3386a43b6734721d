"""A fault-injecting TCP proxy on 127.0.0.1 for S3 tests: stall, truncate or flip bytes of chosen responses.

Each client connection is piped to the upstream server. When a request on it matches
``match`` (a bytes substring of the request, e.g. b"GET /bucket/key") and faults remain
in the budget, the response to that request is damaged:

- ``truncate``: forward ``after`` response bytes, then close;
- ``stall``: forward ``after`` bytes, then send nothing until the client gives up;
- ``flip``: flip one bit of response byte ``after`` (past the headers), keep the length;
- ``status500``: answer ``HTTP/1.1 500`` without asking upstream.

``down = True`` plays the server being down: every connection is closed unanswered.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str  # truncate | stall | flip | status500
    match: bytes
    after: int = 0
    times: int = 1


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.faults: list[Fault] = []
        self.injected = 0
        self.matched_requests = 0
        self.down = False
        self.refused = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def close(self) -> None:
        self._closing.set()
        self.sock.close()

    def _take(self, request: bytes) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.match in request:
                    self.matched_requests += 1
                    if fault.times > 0:
                        fault.times -= 1
                        self.injected += 1
                        return fault
                    return None
        return None

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.down:
            self.refused += 1
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return
        state = {"fault": None, "sent": 0}
        done = threading.Event()

        def client_to_upstream():
            try:
                while data := client.recv(65536):
                    fault = self._take(data)
                    if fault is not None and fault.kind == "status500":
                        body = b"<Error><Code>InternalError</Code></Error>"
                        client.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n"
                                       b"Connection: close\r\n\r\n%s" % (len(body), body))
                        break
                    state["fault"], state["sent"] = fault, 0
                    upstream.sendall(data)
            except OSError:
                pass
            hang_up(close=False)

        def hang_up(*, close: bool) -> None:
            done.set()
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                if close:
                    s.close()

        def upstream_to_client():
            try:
                while data := upstream.recv(65536):
                    fault = state["fault"]
                    if fault is None:
                        client.sendall(data)
                        continue
                    start = state["sent"]
                    state["sent"] += len(data)
                    if fault.kind == "flip":
                        if start <= fault.after < start + len(data):
                            i = fault.after - start
                            data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
                        client.sendall(data)
                    elif state["sent"] <= fault.after:
                        client.sendall(data)
                    else:
                        client.sendall(data[: max(0, fault.after - start)])
                        if fault.kind == "stall":
                            done.wait(60)
                        break
            except OSError:
                pass
            hang_up(close=True)

        threading.Thread(target=client_to_upstream, daemon=True).start()
        threading.Thread(target=upstream_to_client, daemon=True).start()
