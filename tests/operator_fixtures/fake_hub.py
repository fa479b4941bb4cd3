"""A local stand-in for the Hugging Face Hub (HF_ENDPOINT) serving the URLs huggingface_hub calls.

GET  /api/models/ORG/NAME/revision/REV   repo info: commit sha and files with sizes
HEAD /ORG/NAME/resolve/COMMIT/FILE       file metadata (X-Repo-Commit, ETag, Content-Length)
GET  /ORG/NAME/resolve/COMMIT/FILE       the bytes, honouring `Range: bytes=N-`

Private repositories answer 401 without the right token, unknown ones 404 with
X-Error-Code RepoNotFound, unknown revisions 404 RevisionNotFound, like the Hub.
`break_file` cuts that file's next download in half, as a lost connection or a
killed Job would.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GOOD_TOKEN = "hf_test_token"


@dataclass
class Repo:
    files: dict[str, bytes]
    private: bool = False


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)
    broken: set[str] = field(default_factory=set)  # files whose next download is cut in half
    url: str = ""

    def break_file(self, name: str) -> None:
        self.broken.add(name)

    def downloads(self, name: str) -> list[str | None]:
        """Range headers of the GET requests for a file (None = from the start)."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith(f"/{name}")]


def sibling(name: str, data: bytes) -> dict:
    """A file entry of the repo info; weights are LFS files with a sha256, as on the Hub."""
    entry = {"rfilename": name, "size": len(data)}
    if name.endswith(".safetensors"):
        entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def serve(hub: FakeHub):
    """Start the server; returns (hub, shutdown function). Binds 127.0.0.1 only."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.route(send_body=True)

        def do_HEAD(self) -> None:
            self.route(send_body=False)

        def route(self, send_body: bool) -> None:
            path = self.path.split("?")[0]
            hub.requests.append((self.command, path, self.headers.get("Range")))
            info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            repo_id = (info or resolve).group(1) if (info or resolve) else None
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self.error(404, "RepoNotFound", "Repository not found")
            if repo.private and self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
                return self.error(401, None, "Invalid username or password.")
            revision = (info or resolve).group(2)
            if revision not in ("main", COMMIT):
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if info:
                siblings = [sibling(name, data) for name, data in repo.files.items()]
                return self.send(200, json.dumps({"id": repo_id, "sha": COMMIT, "siblings": siblings}).encode(),
                                 {"Content-Type": "application/json"}, send_body)
            self.file(repo, resolve.group(3), send_body)

        def file(self, repo: Repo, name: str, send_body: bool) -> None:
            data = repo.files.get(name)
            if data is None:
                return self.error(404, "EntryNotFound", f"{name} not found")
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            if not send_body:
                return self.send(200, b"", {**headers, "Content-Length": str(len(data))}, False, len(data))
            start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "bytes=0-").group(1))
            if name in hub.broken:  # promise everything, send half, hang up
                hub.broken.discard(name)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            status = 206 if start else 200
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send(status, data[start:], headers, True)

        def error(self, status: int, code: str | None, message: str) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self.send(status, json.dumps({"error": message}).encode(), headers, self.command != "HEAD")

        def send(self, status: int, body: bytes, headers: dict, send_body: bool, length: int | None = None) -> None:
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(body) if length is None else length))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def shutdown() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return hub, shutdown
