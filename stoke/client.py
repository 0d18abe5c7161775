"""The CLI's HTTP client for a controller: where it is and which key to use.

URL: `$STOKE_URL`, else the `url` saved by `stoke up` in `<home>/credentials.json`, else
http://127.0.0.1:8080. Key: `$STOKE_API_KEY`, else the admin key saved there. `<home>` is
`$STOKE_HOME` or ~/.stoke (what `stoke up --home` writes to).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx

from stoke.errors import StokeError

DEFAULT_URL = "http://127.0.0.1:8080"
CREDENTIALS = "credentials.json"


def stoke_home() -> Path:
    return Path(os.environ.get("STOKE_HOME") or "~/.stoke").expanduser()


def read_credentials(home: Path) -> dict[str, str]:
    try:
        doc = json.loads((home / CREDENTIALS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {k: str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def write_credentials(home: Path, doc: dict[str, str]) -> Path:
    """Save the cluster's URL and keys readable by this user only."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / CREDENTIALS
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path.with_suffix(".tmp"), path)
    return path


class Client:
    def __init__(self, url: str, api_key: str, timeout_s: float = 900.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        )

    @classmethod
    def from_env(cls, role: str = "admin_key") -> Client:
        saved = read_credentials(stoke_home())
        url = os.environ.get("STOKE_URL") or saved.get("url") or DEFAULT_URL
        key = os.environ.get("STOKE_API_KEY") or saved.get(role) or saved.get("admin_key", "")
        if not key:
            raise StokeError(
                "no API key: set $STOKE_API_KEY, or run `stoke up` (which saves keys under "
                "$STOKE_HOME or ~/.stoke)."
            )
        return cls(url, key)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request; a non-2xx answer becomes a `StokeError` with the server's words."""
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        _raise_for(response)
        return response.json()

    def stream(self, path: str, body: Any) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
        """POST and yield (response headers, event) for each server-sent event."""
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                headers = dict(response.headers)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise StokeError(f"the stream failed: {event['error'].get('message')}")
                    yield headers, event
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: Exception) -> StokeError:
        return StokeError(
            f"cannot reach the controller at {self.url} ({exc}); is `stoke up` or `stoke "
            "controller` running? Set $STOKE_URL to its address."
        )


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    retry = response.headers.get("retry-after")
    hint = f" (retry after {retry} s)" if retry else ""
    raise StokeError(f"HTTP {response.status_code}: {message}{hint}")
