"""A minimal read-only OCI distribution registry on localhost, for tests.

Serves one OCI archive built by ``oci_image.build_archive`` so that
``ctr images pull --plain-http`` exercises containerd's unpacker (which,
unlike ``ctr images import`` in 1.6, labels snapshots with their target
reference ``containerd.io/snapshot.ref``).
"""

from __future__ import annotations

import json
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _load(archive: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    blobs: dict[str, bytes] = {}
    tags: dict[str, str] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member)
            if f is None:
                continue
            data = f.read()
            if member.name.startswith("blobs/sha256/"):
                blobs["sha256:" + member.name.rsplit("/", 1)[1]] = data
            elif member.name == "index.json":
                for m in json.loads(data)["manifests"]:
                    tag = m["annotations"]["io.containerd.image.name"].rsplit(":", 1)[1]
                    tags[tag] = m["digest"]
    return blobs, tags


@contextmanager
def serve_archive(archive: Path) -> Iterator[str]:
    """Serve ``archive`` on 127.0.0.1; yields ``host:port``."""
    blobs, tags = _load(archive)
    manifest_type = "application/vnd.oci.image.manifest.v1+json"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def _reply(self, body: bytes, ctype: str, digest: str, head: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Content-Digest", digest)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            parts = self.path.split("?", 1)[0].split("/")
            if self.path.rstrip("/") == "/v2":
                self._reply(b"{}", "application/json", "", head)
                return
            if len(parts) >= 5 and parts[1] == "v2" and parts[-2] in ("manifests", "blobs"):
                ref = parts[-1]
                digest = tags.get(ref, ref)
                if digest in blobs:
                    ctype = manifest_type if parts[-2] == "manifests" else (
                        "application/octet-stream")
                    self._reply(blobs[digest], ctype, digest, head)
                    return
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
