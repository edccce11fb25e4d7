"""HTTP servers that record what they are sent, and a network of a test's own to put one on another host.

    unshare --net python tests/netns_recorder.py RECORD.json -- COMMAND...

runs COMMAND in a new network namespace, beside a recorder at REMOTE, then writes the requests
that recorder received to RECORD.json and exits with COMMAND's exit code (COMMAND's output passes
through). Inside, loopback is up and also holds 192.0.2.1 (TEST-NET-1, RFC 5737): for a client it
is another host, not this machine, yet no packet to it leaves the namespace, which ends with
COMMAND. (A dummy interface would hold it as well, but its kernel module is missing in some
containers.)
"""
import json
import socket
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REMOTE_HOST, REMOTE_PORT = "192.0.2.1", 8080  # the namespace is new: the port is free
REMOTE = f"http://{REMOTE_HOST}:{REMOTE_PORT}"


class Recorder(ThreadingHTTPServer):
    """Answers every request with `status` (MLflow's answers when 200), or redirects it to the same
    path at `redirect`, and records its path and headers (their names in lower case)."""

    def __init__(self, host: str, port: int = 0, status: int = 200, health: int | None = None, redirect: str = ""):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.status, self.health, self.redirect, self.requests = status, health or status, redirect, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def server_bind(self) -> None:
        # HTTPServer's own looks its address up by DNS (socket.getfqdn) for a name nothing here
        # uses: for 127.0.0.2 a query to the resolver, another host.
        socketserver.TCPServer.server_bind(self)

    @property
    def uri(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append((self.path, {name.lower(): value for name, value in self.headers.items()}))
        if self.server.redirect and self.path != "/health":
            self.send_response(307)  # keeps the method and the body
            self.send_header("Location", self.server.redirect + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = self.server.health if self.path == "/health" else self.server.status
        body = (b"OK" if self.path == "/health" else json.dumps({"experiments": []}).encode()) \
            if status == 200 else b"<html>Bad Gateway</html>"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def available() -> bool:
    """Whether this user may make a network namespace and set up its addresses (root, unshare and ip)."""
    try:
        return subprocess.run(["unshare", "--net", "ip", "addr", "add", f"{REMOTE_HOST}/32", "dev", "lo"],
                              capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def main(record_file: str, command: list[str]) -> int:
    for setup in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{REMOTE_HOST}/32", "dev", "lo"]):
        subprocess.run(setup, check=True)
    remote = Recorder(REMOTE_HOST, REMOTE_PORT)
    try:
        code = subprocess.run(command).returncode
    finally:
        remote.stop()
    with open(record_file, "w") as f:
        json.dump(remote.requests, f)
    return code


if __name__ == "__main__":
    separator = sys.argv.index("--")
    sys.exit(main(sys.argv[1], sys.argv[separator + 1:]))
