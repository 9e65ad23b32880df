#!/usr/bin/env python3
"""The example's API backend (python3 standard library only).

    python3 examples/spa/api.py PORT [HOST]

Answers every request with JSON describing what it received: the method,
the path with its query, the request body's length and the headers a proxy
sets (Host, X-Forwarded-For, X-Real-IP, X-Forwarded-Proto). PORT 0 picks a
free port. Once bound it prints one line, `listening on HOST:PORT`, on
stdout and flushes it: scripts and tests wait for that line.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN_HEADERS = ("Host", "X-Forwarded-For", "X-Real-IP", "X-Forwarded-Proto")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self):
        return "spa-example-api"

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        out = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "body_length": len(body),
                "headers": {h: self.headers.get(h) for h in SEEN_HEADERS},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = answer


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: api.py PORT [HOST]")
    host = sys.argv[2] if len(sys.argv) == 3 else "127.0.0.1"
    server = ThreadingHTTPServer((host, int(sys.argv[1])), Handler)
    server.daemon_threads = True
    print("listening on %s:%d" % server.server_address[:2], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
