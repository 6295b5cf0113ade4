"""Disconnects, queue overflow, concurrency, keep-alive, shutdown."""
import concurrent.futures as cf
import socket
import time

import httpx

from scripts import PLAIN

MODEL = "deepseek-v4-flash"


def wait_idle(s, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if s.metrics()["ds4_running"] == 0:
            return time.time() - t0
        time.sleep(0.02)
    raise AssertionError("engine still busy")


def raw_post(s, path, body):
    sock = socket.create_connection(("127.0.0.1", s.port))
    data = body.encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_disconnect_mid_generation_stops_within_half_a_second(make_server):
    s = make_server(args=["--test-delay-ms", "20"])  # sampled tokens, 20 ms each
    sock = raw_post(s, "/v1/chat/completions", '{"stream":true,"max_tokens":5000,"messages":[{"role":"user","content":"hi"}]}')
    got = b""
    while got.count(b"data:") < 5:
        got += sock.recv(4096)
    assert s.metrics()["ds4_running"] == 1
    sock.close()
    assert wait_idle(s, 2.0) < 0.5


def test_disconnect_during_prefill_and_non_stream(make_server):
    s = make_server(args=["--test-delay-ms", "20"])  # prefill: 20 ms per 8 tokens
    long = "word " * 3000
    for stream in ("true", "false"):
        sock = raw_post(s, "/v1/chat/completions", '{"stream":%s,"max_tokens":5,"messages":[{"role":"user","content":"%s"}]}' % (stream, long))
        deadline = time.time() + 5
        while s.metrics()["ds4_running"] == 0 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        sock.close()
        assert wait_idle(s, 2.0) < 0.5
    assert s.log_text().count("prefill cancelled") == 2


def test_queue_overflow_429_with_retry_after(make_server):
    s = make_server(args=["--test-delay-ms", "20", "--queue", "1"])
    body = {"model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]}
    with cf.ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(lambda _: httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60), range(6)))
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes and 429 in codes, codes
    r429 = [r for r in rs if r.status_code == 429][0]
    assert int(r429.headers["retry-after"]) > 0 and r429.json()["error"]["type"] == "rate_limit_error"
    # Anthropic shape for /v1/messages.
    with cf.ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(lambda _: httpx.post(s.url + "/v1/messages", json=body, timeout=60), range(6)))
    bad = [r for r in rs if r.status_code == 429]
    assert bad and bad[0].json()["type"] == "error" and bad[0].json()["error"]["type"] == "rate_limit_error"


def test_twenty_concurrent_clients(make_server):
    s = make_server([f"answer {i}" for i in range(20)], args=["--queue", "32"])
    c = s.openai(timeout=60)
    a = s.anthropic(timeout=60)

    def one(i):
        if i % 2:
            r = c.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": f"q{i}"}])
            return r.choices[0].message.content
        r = a.messages.create(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": f"q{i}"}])
        return r.content[0].text

    t0 = time.time()
    with cf.ThreadPoolExecutor(20) as ex:
        out = list(ex.map(one, range(20)))
    assert time.time() - t0 < 60
    assert sorted(out) == sorted(f"answer {i}" for i in range(20))


def test_keepalive_during_long_prefill(make_server):
    s = make_server([PLAIN], args=["--test-delay-ms", "10", "--keepalive-secs", "1"])
    body = {"model": MODEL, "stream": True, "max_tokens": 5, "messages": [{"role": "user", "content": "word " * 2000}]}
    with httpx.stream("POST", s.url + "/v1/messages", json=body, timeout=60) as r:
        text = "".join(r.iter_text())
    assert text.startswith("event: message_start")
    assert "event: ping" in text and text.rstrip().endswith('{"type":"message_stop"}')


def test_graceful_shutdown(make_server):
    s = make_server([PLAIN])
    assert s.stop() == 0
    assert "bye" in s.log_text()
