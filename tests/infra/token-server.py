"""A registry token service for tests (the Docker "token authentication" flow).

    python3 token-server.py --port P --key KEY.pem --cert CERT.pem --users FILE --log FILE

GET /token?service=S&scope=repository:NAME:ACTIONS[&scope=...] with HTTP basic auth answers
{"token": JWT} granting every scope asked for when the user and password match a line
`user:password` of FILE; without credentials it answers a token that grants nothing (so the
registry refuses, as a private registry does); with wrong credentials, 401.
The JWT is RS256, signed with the openssl command line, with the certificate in its `x5c`
header so that docker-registry (`auth.token.rootcertbundle`) can verify it.
Each request is logged as a JSON line: {"user", "scopes", "status"} (never a password).
Standard library only: it runs with any python3.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

ISSUER = "cistate-test-issuer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Service:
    def __init__(self, key: str, cert: str, users: str, log: str) -> None:
        self.key = key
        with open(cert, encoding="ascii") as f:
            pem = f.read()
        body = "".join(line for line in pem.splitlines() if "-----" not in line)
        self.x5c = [body]  # base64 DER, as JOSE wants it
        self.users: dict[str, str] = {}
        with open(users, encoding="utf-8") as f:
            for line in f:
                if ":" in line:
                    user, _, password = line.rstrip("\n").partition(":")
                    self.users[user] = password
        self.log_path = log
        self.lock = threading.Lock()

    def sign(self, claims: dict[str, object]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": self.x5c}
        signing_input = (
            f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.key],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{b64url(signature)}"

    def record(self, entry: dict[str, object]) -> None:
        with self.lock, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def make_handler(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path != "/token":
                self.send_error(404)
                return
            query = parse_qs(url.query)
            scopes = query.get("scope", [])
            user = self._user()
            if user is False:
                service.record({"user": None, "scopes": scopes, "status": 401})
                self._reply(
                    401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
                )
                return
            access = []
            if user:
                for scope in scopes:
                    kind, _, rest = scope.partition(":")
                    name, _, actions = rest.rpartition(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
            now = int(time.time())
            claims = {
                "iss": ISSUER,
                "sub": user or "",
                "aud": query.get("service", [""])[0],
                "exp": now + 300,
                "nbf": now - 10,
                "iat": now,
                "jti": uuid.uuid4().hex,
                "access": access,
            }
            service.record({"user": user or None, "scopes": scopes, "status": 200})
            token = service.sign(claims)
            self._reply(200, {"token": token, "access_token": token, "expires_in": 300})

        def _user(self) -> str | bool:
            """'' anonymous, the user name when the password matches, False when it does not."""
            header = self.headers.get("Authorization", "")
            if not header.startswith("Basic "):
                return ""
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            expected = service.users.get(user)
            if expected is None or not hmac.compare_digest(expected, password):
                return False
            return user

        def _reply(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write("token-server: " + format % args + "\n")

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--users", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    service = Service(args.key, args.cert, args.users, args.log)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(service))
    server.serve_forever()


if __name__ == "__main__":
    main()
