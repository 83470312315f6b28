"""A test ARGO Messaging Service over real HTTPS: the parts of the AMS v1 REST API that
``argo-ams-library``'s publisher calls, as ARGO documents them (no tests here).

- ``GET https://HOST:8443/v1/service-types/ams/hosts/HOST:authx509`` (the authn X.509
  mapping): the TLS client certificate's DN is looked up; 200 ``{"token": "..."}``, or 401
  when no or an unknown certificate was presented.
- ``POST https://HOST:443/v1/projects/PROJECT/topics/TOPIC:publish`` with header
  ``x-api-key``: body ``{"messages": [{"attributes": {...}, "data": "<base64>"}]}``;
  200 ``{"messageIds": ["N", ...]}`` one id per message, in order.
- Errors as AMS sends them: ``{"error": {"code": N, "message": "...", "status": "..."}}``
  with 400 (invalid arguments), 401 (bad token), 403, 404 (no such project/topic),
  409, 413 (over 1 MB), 500/502/503/504 (the balancer).

``plan`` scripts what the next publish requests meet, one entry each, then normal service:
``("status", N)`` answer N without storing; ``("stored-then", N)`` store, then answer N (a
lost answer); ``"cut"`` read the request and close the connection without an answer;
``("slow", S)`` store, then answer after S seconds (a client timeout); ``("body", TEXT)`` store,
then answer 200 with TEXT (a broken or hostile answer).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple, Union

MAX_MESSAGE_BYTES = 1_000_000
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
           413: "INVALID_ARGUMENT", 500: "INTERNAL_SERVER_ERROR", 502: "BAD_GATEWAY", 503: "UNAVAILABLE",
           504: "GATEWAY_TIMEOUT"}
_PUBLISH = re.compile(r"^/v1/projects/([^/]+)/topics/([^/:]+):publish$")
_AUTHX509 = re.compile(r"^/v1/service-types/ams/hosts/([^/:]+):authx509$")

Step = Union[str, Tuple[str, Union[float, str]]]


@dataclass(frozen=True)
class Published:
    """One message as AMS stored it."""

    project: str
    topic: str
    message_id: str
    attributes: Dict[str, str]
    data: bytes  # base64-decoded


class AmsServer:
    """Two HTTPS listeners on ``address`` (publish on ``port``, authn on ``authn_port``)."""

    def __init__(self, address: str, server_cert: str, server_key: str, client_ca: str, *,
                 project: str = "accounting", topics: Tuple[str, ...] = ("gLite-APEL", "eu-egi-cloud-accounting"),
                 allowed_dns: Tuple[str, ...] = (), token: str = "s3cr3t-token", port: int = 443,
                 authn_port: int = 8443) -> None:
        self.project = project
        self.topics = topics
        self.allowed_dns = allowed_dns
        self.token = token
        self.plan: List[Step] = []
        self.published: List[Published] = []
        self.requests: List[Tuple[str, str]] = []  # (method, path) of every request
        self.lock = threading.Lock()
        self._next_id = 0
        self._servers = [self._serve(address, port, server_cert, server_key, client_ca, publish=True),
                         self._serve(address, authn_port, server_cert, server_key, client_ca, publish=False)]

    def _serve(self, address: str, port: int, cert: str, key: str, client_ca: str, publish: bool) -> ThreadingHTTPServer:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL  # authn wants the host certificate; publish does not
        ams = self

        class Handler(_Handler):
            server_side = ams
            is_publish = publish

        server = ThreadingHTTPServer((address, port), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def store(self, project: str, topic: str, messages: List[dict]) -> List[str]:
        ids = []
        with self.lock:
            for m in messages:
                self._next_id += 1
                ids.append(str(self._next_id))
                self.published.append(Published(project, topic, ids[-1], dict(m.get("attributes") or {}),
                                                base64.b64decode(m.get("data") or "")))
        return ids

    def next_step(self) -> Optional[Step]:
        with self.lock:
            return self.plan.pop(0) if self.plan else None

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_side: AmsServer
    is_publish: bool
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _json(self, code: int, value: dict) -> None:
        body = json.dumps(value).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"error": {"code": code, "message": message, "status": _STATUS.get(code, "ERROR")}})

    def do_GET(self) -> None:
        ams = self.server_side
        with ams.lock:
            ams.requests.append(("GET", self.path))
        match = _AUTHX509.match(self.path)
        if self.is_publish or not match:
            return self._error(404, "Not Found")
        peer = self.connection.getpeercert()
        if not peer:
            return self._error(401, "Unauthorized: no certificate presented")
        dn = "/" + "/".join(f"{k}={v}" for rdn in peer["subject"] for k, v in rdn)
        dn = dn.replace("countryName", "C").replace("organizationName", "O").replace("commonName", "CN")
        if dn not in ams.allowed_dns:
            return self._error(401, f"Unauthorized: {dn} is not a registered service host")
        self._json(200, {"token": ams.token})

    def do_POST(self) -> None:
        ams = self.server_side
        with ams.lock:
            ams.requests.append(("POST", self.path))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        match = _PUBLISH.match(self.path)
        if not self.is_publish or not match:
            return self._error(404, "Not Found")
        if self.headers.get("x-api-key") != ams.token:
            return self._error(401, "Unauthorized")
        project, topic = match.groups()
        if project != ams.project or topic not in ams.topics:
            return self._error(404, "Topic doesn't exist")
        if length > MAX_MESSAGE_BYTES:
            return self._error(413, "Message size too large")
        try:
            messages = json.loads(raw)["messages"]
            assert isinstance(messages, list) and messages
            for m in messages:
                assert isinstance(m, dict) and (m.get("data") or m.get("attributes"))
                base64.b64decode(m.get("data") or "", validate=True)
        except (ValueError, KeyError, TypeError, AssertionError):
            return self._error(400, "Invalid Message Arguments")
        step = ams.next_step()
        if step == "cut":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if isinstance(step, tuple) and step[0] == "status":
            return self._error(int(step[1]), "scripted failure")
        ids = ams.store(project, topic, messages)
        if isinstance(step, tuple) and step[0] == "stored-then":
            return self._error(int(step[1]), "scripted failure after storing")
        if isinstance(step, tuple) and step[0] == "slow":
            time.sleep(float(step[1]))
        if isinstance(step, tuple) and step[0] == "body":
            body = str(step[1]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        try:
            self._json(200, {"messageIds": ids})
        except OSError:
            pass
