#!/usr/bin/env python3
"""Logging reverse proxy for the agent-client tests.

Usage: logproxy.py LISTEN_PORT UPSTREAM_PORT LOG.jsonl

Forwards every request to http://127.0.0.1:UPSTREAM_PORT unchanged, streams the response back
unchanged (SSE included, chunk by chunk), and appends one JSON object per exchange to LOG.jsonl:
method, path, request headers (credentials redacted), request body (parsed JSON when it is
JSON), response status, response content type and the response body (text, truncated). The
real clients talk to this proxy, so the log shows exactly what they sent and what the server
answered. Prints "ready" on stdout once listening.
"""
import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
SEQ = [0]
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
REDACT = {"authorization", "x-api-key", "cookie"}
MAX_RESP = 200_000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = 0
    log_path = ""

    def log_message(self, *a):  # quiet
        pass

    def _proxy(self):
        with LOCK:
            SEQ[0] += 1
            seq = SEQ[0]
        t0 = time.time()
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        hdrs = {k: v for k, v in self.headers.items() if k.lower() not in HOP and k.lower() != "host"}
        entry = {
            "seq": seq,
            "t": round(t0, 3),
            "method": self.command,
            "path": self.path,
            "headers": {k: ("<redacted>" if k.lower() in REDACT else v) for k, v in hdrs.items()},
        }
        try:
            entry["body"] = json.loads(body) if body else None
        except ValueError:
            entry["body_text"] = body[:4000].decode("utf-8", "replace")
        resp_buf = bytearray()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=600)
            conn.request(self.command, self.path, body=body or None, headers=hdrs)
            r = conn.getresponse()
            entry["status"] = r.status
            entry["content_type"] = r.getheader("content-type")
            self.send_response_only(r.status, r.reason)
            for k, v in r.getheaders():
                if k.lower() not in HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            while True:
                chunk = r.read1(65536)
                if not chunk:
                    break
                if len(resp_buf) < MAX_RESP:
                    resp_buf += chunk
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            conn.close()
        except Exception as e:  # client went away or upstream failed: record it
            entry["proxy_error"] = repr(e)
            self.close_connection = True
        entry["elapsed_s"] = round(time.time() - t0, 3)
        entry["response"] = resp_buf[:MAX_RESP].decode("utf-8", "replace")
        with LOCK, open(self.log_path, "a") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = _proxy


class Trap(BaseHTTPRequestHandler):
    """Set as HTTP(S)_PROXY for the clients (with NO_PROXY=127.0.0.1,localhost): any attempt to
    reach the internet lands here, is logged and refused."""

    protocol_version = "HTTP/1.1"
    log_path = ""

    def log_message(self, *a):
        pass

    def _trap(self):
        with LOCK, open(self.log_path, "a") as f:
            f.write(json.dumps({"t": round(time.time(), 3), "method": self.command, "target": self.path}) + "\n")
        self.send_response(403)
        self.send_header("content-length", "0")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True

    do_CONNECT = do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = _trap


def start_trap(log_path):
    handler = type("T", (Trap,), {"log_path": str(log_path)})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def start(listen, upstream, log_path):
    """Serves in a background thread; returns the server (call .shutdown() to stop)."""
    handler = type("H", (Handler,), {"upstream": upstream, "log_path": str(log_path)})
    srv = ThreadingHTTPServer(("127.0.0.1", listen), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


if __name__ == "__main__":
    start(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    print("ready", flush=True)
    threading.Event().wait()
