"""Starts the real ds4-server binary on a loopback port for the SDK tests."""
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def server_bin():
    b = os.environ.get("DS4_SERVER_BIN")
    if b:
        return b
    for p in ("target/release/ds4-server", "target/debug/ds4-server"):
        if (ROOT / p).exists():
            return str(ROOT / p)
    raise RuntimeError("build ds4-server first (tests/server/run.sh does)")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """One server process. `outputs` becomes the --test-output script."""

    def __init__(self, outputs=None, args=(), tmp=None, layers=None):
        self.tmp = Path(tmp or tempfile.mkdtemp(prefix="ds4srv-"))
        # The demo model is real (synthetic weights); fewer layers keep the suite fast on 2 cores.
        self.layers = layers or int(os.environ.get("DS4_TEST_DEMO_LAYERS", "1"))
        self.outputs = outputs
        self.args = list(args)
        self.port = None
        self.proc = None
        self.log_path = self.tmp / f"server-{time.time_ns()}.log"

    def start(self):
        self.port = free_port()
        cmd = [server_bin(), "--port", str(self.port), "-m", str(self.tmp / "no-model.gguf"),
               "--demo-layers", str(self.layers)]
        if self.outputs is not None:
            p = self.tmp / "outputs.json"
            p.write_text(json.dumps(self.outputs))
            cmd += ["--test-output", str(p)]
        cmd += self.args
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + self.log_text())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy:\n" + self.log_text())

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        """Graceful stop (SIGTERM): writes the shutdown checkpoint."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()
        return self.proc.returncode if self.proc else None

    def log_text(self):
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def metrics(self):
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "sk-test"), max_retries=0, **kw)

    def anthropic(self, **kw):
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key=kw.pop("api_key", "sk-test"), max_retries=0, **kw)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(outputs=None, args=(), tmp=None, layers=None):
        s = Server(outputs, args, tmp or tmp_path, layers)
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.stop()
