"""A fault-injecting TCP proxy on 127.0.0.1 in front of the moto server, for the outage tests.

Why a proxy and not stopping moto: moto keeps its buckets in memory, so a restarted server has lost
everything, which is not what an outage of a real S3 looks like. Through the proxy the data stays
put while clients see the faults a real outage gives:

* :meth:`S3Proxy.down` closes the listening socket and drops every open connection: new requests
  get *connection refused*, requests in flight lose their connection;
* :meth:`S3Proxy.up` listens again on the same port;
* :meth:`S3Proxy.errors` answers the next ``n`` requests itself with an S3-style error (503
  SlowDown by default; 500 InternalError, ...) without forwarding them.

Passing traffic is copied byte for byte by two threads per connection; nothing is parsed except
the requests that :meth:`errors` answers.
"""
from __future__ import annotations

import socket
import threading


class S3Proxy:
    def __init__(self, target: str):
        host_port = target.split("://", 1)[-1].rstrip("/")
        host, port = host_port.rsplit(":", 1)
        self.target = (host, int(port))
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._errors: list[tuple[int, str]] = []
        self.answered = 0          # requests answered with an injected error
        self.accepted = 0          # connections accepted (forwarded or answered)
        self._listener: socket.socket | None = None
        self.port = 0
        self.up()
        self.url = f"http://127.0.0.1:{self.port}"

    # -- switches -------------------------------------------------------------------------------
    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(128)
            self.port = s.getsockname()[1]
            self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            s, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if s is not None:
            _close(s)
        for c in conns:
            _close(c)

    def errors(self, n: int, status: int = 503, code: str = "SlowDown") -> None:
        """Answer the next ``n`` requests with ``status``/``code``; open connections are dropped
        so that the next requests come on new ones."""
        with self._lock:
            self._errors += [(status, code)] * n
            conns, self._conns = self._conns, set()
        for c in conns:
            _close(c)

    def close(self) -> None:
        self.down()

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    # -- plumbing -------------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            with self._lock:
                if self._listener is not listener:
                    _close(client)
                    return
                self.accepted += 1
                err = self._errors.pop(0) if self._errors else None
                self._conns.add(client)
            if err is not None:
                threading.Thread(target=self._answer, args=(client, *err), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.add(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def _answer(self, client: socket.socket, status: int, code: str) -> None:
        """Read one request (headers and a Content-Length body) and answer it with an S3 error."""
        try:
            client.settimeout(10)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = client.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            length, expect = 0, False
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
                if k.strip().lower() == b"expect":
                    expect = True   # 100-continue: the body comes only after a 100; answer at once, as S3 may
            if expect:
                length = 0
            while len(body) < length:
                chunk = client.recv(1 << 16)
                if not chunk:
                    break
                body += chunk
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>injected by the test proxy</Message><RequestId>proxy</RequestId></Error>").encode()
            reason = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                      429: "Too Many Requests"}.get(status, "Error")
            client.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                           f"Content-Length: {len(xml)}\r\nConnection: close\r\n\r\n".encode() + xml)
            with self._lock:
                self.answered += 1
        except OSError:
            pass
        finally:
            _close(client)
            with self._lock:
                self._conns.discard(client)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
