"""Start a real ComfyUI (`main.py --cpu`) with the pack installed, and talk to it over HTTP and a
minimal standard-library websocket client (no dependency beyond the Python standard library)."""
import base64
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebSocket:
    """Client side of RFC 6455, text frames only (binary preview frames are skipped)."""

    def __init__(self, host, port, path):
        self.sock = socket.create_connection((host, port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")
        self.messages = queue.Queue()
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    def _read_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        return buf

    def _reader(self):
        self.sock.settimeout(None)
        try:
            while True:
                b0, b1 = self._read_exact(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read_exact(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read_exact(8))[0]
                mask = self._read_exact(4) if b1 & 0x80 else None
                data = self._read_exact(n)
                if mask:
                    data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
                if opcode == 1:
                    self.messages.put(json.loads(data.decode()))
                elif opcode == 8:
                    return
                elif opcode == 9:  # ping -> pong (masked, as a client must)
                    m = os.urandom(4)
                    self.sock.sendall(bytes([0x8A, 0x80 | len(data)]) + m + bytes(c ^ m[i % 4] for i, c in enumerate(data)))
        except (OSError, ConnectionError, ValueError):
            return

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class ComfyServer:
    def __init__(self, comfy_path, base_dir, extra_args=(), python=sys.executable, cpu=True):
        self.comfy_path, self.base_dir = comfy_path, base_dir
        self.port = free_port()
        self.log_path = os.path.join(base_dir, f"comfyui_{self.port}.log")
        yaml = os.path.join(base_dir, "extra_model_paths.yaml")
        cmd = [python, os.path.join(comfy_path, "main.py"), *(["--cpu"] if cpu else []), "--listen", "127.0.0.1",
               "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config", yaml,
               "--output-directory", os.path.join(base_dir, "output"), "--input-directory", os.path.join(base_dir, "input"),
               "--user-directory", os.path.join(base_dir, "user"), "--database-url",
               "sqlite:///" + os.path.join(base_dir, "user", f"comfyui_{self.port}.db"),
               *extra_args]
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=comfy_path, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.client_id = uuid.uuid4().hex
        self._wait_ready()
        self.ws = WebSocket("127.0.0.1", self.port, f"/ws?clientId={self.client_id}")

    def _wait_ready(self, timeout=180):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, data):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode()[:3000]}") from None

    def run(self, prompt: dict, timeout=300):
        """Queue an API-format prompt and wait for it. Returns (history entry, websocket messages,
        error message or None)."""
        while not self.ws.messages.empty():
            self.ws.messages.get_nowait()
        pid = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        msgs, error = [], None
        t0 = time.time()
        while True:
            left = timeout - (time.time() - t0)
            if left <= 0:
                raise TimeoutError(f"prompt {pid} did not finish in {timeout} s:\n{self.log()[-3000:]}")
            try:
                m = self.ws.messages.get(timeout=left)
            except queue.Empty:
                continue
            msgs.append(m)
            t, d = m.get("type"), m.get("data") or {}
            if d.get("prompt_id") not in (None, pid):
                continue
            if t == "execution_error":
                error = f"{d.get('exception_type')}: {d.get('exception_message')}"
                break
            if t == "execution_interrupted":
                error = "interrupted"
                break
            if t == "executing" and d.get("node") is None and d.get("prompt_id") == pid:
                break
        hist = self.get(f"/history/{pid}").get(pid, {})
        return hist, msgs, error

    def stop(self):
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
