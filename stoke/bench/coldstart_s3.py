"""A read-only, S3-compatible loopback server for `stoke bench coldstart`: the files under ROOT
are the objects of one bucket (`s3://BUCKET/<path under ROOT>`), served with path-style GET and
HEAD, `Range` included, straight from the page cache with sendfile.

    python -m stoke.bench.coldstart_s3 ROOT BUCKET   # prints its port; serves until stdin closes

Why not moto's server (which `stoke bench fetch` uses): moto reads a whole object into memory
for every ranged GET (`FakeKey.value`, then a slice), so the node's 16 parallel 16 MiB parts of
a 4.3 GB partition would need about 69 GB, and each part costs a read of the whole object. This
server checks no signatures and implements nothing but reads: enough for the node's fetcher and
the controller's model inspection, which only call GetObject.
"""

from __future__ import annotations

import re
import sys
import threading
import urllib.parse
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, bucket: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root.resolve()
        self.bucket = bucket


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the fetcher reuses its connections
    server: _Server

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per part would only cost time

    def _serve(self, *, body: bool) -> None:
        path = self._object_path()
        if path is None:
            return self._error(404, "NoSuchKey", "The specified key does not exist.")
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if wanted:
            match = _RANGE.fullmatch(wanted.strip())
            if not match or (match.group(1) and int(match.group(1)) >= size):
                return self._error(416, "InvalidRange", f"{wanted} of {size} bytes")
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            elif last:  # a suffix: the last N bytes
                start = max(0, size - int(last))
            else:
                return self._error(416, "InvalidRange", f"{wanted}: no bytes named")
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{size:x}-{path.stat().st_mtime_ns:x}"')
        self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body and end >= start:
            self.wfile.flush()
            with open(path, "rb") as f:
                self.connection.sendfile(f, start, end - start + 1)

    def _object_path(self) -> Path | None:
        """The file behind a path-style `/BUCKET/KEY`, or None (no such key, or outside ROOT)."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        bucket, _, key = path.removeprefix("/").partition("/")
        if bucket != self.server.bucket or not key:
            return None
        found = (self.server.root / key).resolve()
        if self.server.root not in found.parents or not found.is_file():
            return None
        return found

    def _error(self, status: int, code: str, message: str) -> None:
        doc = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        data = f"{doc}<Message>{message}</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def main(argv: list[str]) -> int:
    server = _Server(Path(argv[0]), argv[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or exits)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
