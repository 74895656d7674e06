"""Where batches of line protocol go: InfluxDB's v2 or 1.x write API, or local files (blocking; run in a thread)."""

from __future__ import annotations

import base64
import email.utils
import gzip as gzip_module
import http.client
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from hub.ingest._spool import fsync_dir

__all__ = [
    "FileSink",
    "InfluxV1Sink",
    "InfluxV2Sink",
    "Sink",
    "SinkError",
    "SinkRejected",
    "SinkTooLarge",
    "SinkUnavailable",
    "error_for_status",
    "file_header",
    "import_commands",
    "parse_retry_after",
]

log = logging.getLogger("hub.sinks")


class SinkError(Exception):
    """A write failed; `status` is the HTTP status if there was one, `retry_after` seconds if advised."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class SinkUnavailable(SinkError):
    """Not written, try again later: connection error, timeout, 429, 5xx, or 401/403 (misconfiguration)."""


class SinkRejected(SinkError):
    """The data was refused (400/422: a bad line or a field type conflict); retrying it will not help."""


class SinkTooLarge(SinkError):
    """The request body was too large (413): send it in smaller pieces."""


class Sink(Protocol):
    """A destination for line protocol. Methods block; the pipeline calls them from a worker thread."""

    description: str

    def write(self, body: str) -> None:
        """Write lines joined by `\\n` (ms precision) durably, or raise `SinkError`."""
        ...

    def check(self) -> bool:
        """Whether the destination is reachable right now (cheap)."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


class _Headers(Protocol):
    """An HTTP answer's headers: a plain mapping, or http.client's `HTTPMessage`."""

    def get(self, name: str, /) -> str | None: ...


def error_for_status(status: int, headers: _Headers | None, detail: str) -> SinkError:
    """The `SinkError` subclass a failed HTTP write answer maps to."""
    retry_after = parse_retry_after(headers.get("Retry-After") if headers is not None else None)
    message = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
    if status in (400, 422):
        return SinkRejected(message, status)
    if status == 413:
        return SinkTooLarge(message, status)
    # 429, 5xx, 401/403 and anything unexpected (404 bucket not found, ...): keep the data, retry.
    return SinkUnavailable(message, status, retry_after)


def _short(data: object, limit: int = 300) -> str:
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    text = str(data or "").strip()
    return text if len(text) <= limit else text[:limit] + "..."


class _KeptAlive:
    """POSTs over one kept-alive HTTP connection (a writer thread's: not shared between threads).

    A kept-alive connection the server has closed meanwhile fails on reuse: the request is sent once more on a fresh
    one (harmless for a write: InfluxDB overwrites a point with the same series and timestamp)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"InfluxDB URL must be http(s)://host[:port][/path], not {url!r}")
        self.url = url.rstrip("/")
        self.base = parts.path.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._timeout = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        """A new connection to the server (not kept)."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def post(self, path: str, data: bytes, headers: dict[str, str]) -> tuple[int, http.client.HTTPMessage, bytes]:
        """The answer's status, headers and body; raises `SinkUnavailable` if there is none."""
        for reused in (self._conn is not None, False):
            conn = self._conn or self.connect(self._timeout)
            self._conn = None
            try:
                conn.request("POST", path, body=data, headers=headers)
                resp = conn.getresponse()
                answer = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and not isinstance(exc, TimeoutError):  # a timeout means slow, not stale
                    log.debug("kept-alive connection to %s failed (%s): reconnecting", self.url, exc)
                    continue
                raise SinkUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc
            if resp.will_close:
                conn.close()
            else:
                self._conn = conn
            return resp.status, resp.headers, answer
        raise AssertionError("unreachable: the second attempt returns or raises")

    def write(self, path: str, headers: dict[str, str], body: str, gzip_level: int) -> None:
        """POST `body` (line protocol) to `path`, gzipped at `gzip_level` (0: not); raise `SinkUnavailable`,
        `SinkRejected` or `SinkTooLarge` on failure."""
        data = body.encode()
        if gzip_level:
            data = gzip_module.compress(data, compresslevel=gzip_level)
        status, answer_headers, answer = self.post(path, data, headers)
        if not 200 <= status < 300:
            raise error_for_status(status, answer_headers, _error_text(answer))

    def close(self) -> None:
        """Close the kept-alive connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class InfluxV2Sink:
    """InfluxDB v2 write API (`/api/v2/write`, also served by VictoriaMetrics and InfluxDB 1.8+).

    Writes go over one kept-alive connection of our own (`_KeptAlive`; never retried here: the pipeline retries);
    influxdb-client answers `check`. Its write call cost the writer thread 0.30 ms of CPU for 40 points, the same
    request made here 0.11 ms: the writer's Python holds the GIL that the trio thread waits for.
    """

    def __init__(self, url: str, token: str, org: str, bucket: str, timeout_s: float = 10.0, gzip: bool = True) -> None:
        # Imported here: the base install (device side) has no influxdb-client.
        import urllib3
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.rest import ApiException
        from influxdb_client.service.ping_service import PingService

        self._http = _KeptAlive(url, timeout_s)
        self.url = url
        self.org = org
        self.bucket = bucket
        self.description = f"InfluxDB v2 API at {url}, org {org!r}, bucket {bucket!r}"
        query = urllib.parse.urlencode({"org": org, "bucket": bucket, "precision": "ms"})
        self._write_path = f"{self._http.base}/api/v2/write?{query}"
        # Gzip at level 1: level 9 (influxdb-client's) costs the writer thread, and through the GIL ingest, several
        # times more CPU for a few percent smaller bodies.
        self._gzip = gzip
        self._headers = {"Content-Type": "text/plain; charset=utf-8", "Authorization": f"Token {token}"}
        if gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._timeout_ms = max(1, int(timeout_s * 1000))
        self._client = InfluxDBClient(url=url, token=token, org=org, timeout=self._timeout_ms, retries=False)
        self._ping = PingService(self._client.api_client)
        self._ping_errors: tuple[type[BaseException], ...] = (ApiException, urllib3.exceptions.HTTPError, OSError)

    def write(self, body: str) -> None:
        """POST the lines; raise `SinkUnavailable`, `SinkRejected` or `SinkTooLarge` on failure."""
        self._http.write(self._write_path, self._headers, body, 1 if self._gzip else 0)

    def check(self) -> bool:
        """Whether `/ping` answers within a couple of seconds."""
        try:
            self._ping.get_ping(_request_timeout=min(self._timeout_ms, 2000))
        except self._ping_errors as exc:
            log.debug("ping %s failed: %s", self.url, exc)
            return False
        return True

    def close(self) -> None:
        """Close the connections."""
        self._http.close()
        self._client.close()


class InfluxV1Sink:
    """InfluxDB 1.x write API (`POST /write?db=&rp=&precision=ms`), over one kept-alive HTTP connection.

    Credentials go in an HTTP Basic `Authorization` header (1.x accepts it like `u`/`p`), so the
    password never appears in a URL or a log line. A 404 (database not found) is `SinkUnavailable`:
    the data is kept until someone creates the database.
    """

    def __init__(
        self,
        url: str,
        database: str,
        *,
        retention_policy: str = "",
        username: str = "",
        password: str = "",
        timeout_s: float = 10.0,
        gzip: bool = True,
    ) -> None:
        if not database:
            raise ValueError("InfluxDB 1.x needs a database name")
        self._http = _KeptAlive(url, timeout_s)
        self.url = self._http.url
        self.database = database
        self.retention_policy = retention_policy
        self.description = (
            f"InfluxDB 1.x API at {self.url}, database {database!r}"
            + (f", retention policy {retention_policy!r}" if retention_policy else "")
            + (f", user {username!r}" if username else "")
        )
        self._base = self._http.base
        query = {"db": database, "precision": "ms"}
        if retention_policy:
            query["rp"] = retention_policy
        self._write_path = f"{self._base}/write?{urllib.parse.urlencode(query)}"
        self._timeout = timeout_s
        self._gzip = gzip
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if gzip:
            self._headers["Content-Encoding"] = "gzip"
        if username or password:
            secret = base64.b64encode(f"{username}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {secret}"

    def write(self, body: str) -> None:
        """POST the lines; raise `SinkUnavailable`, `SinkRejected` or `SinkTooLarge` on failure."""
        self._http.write(self._write_path, self._headers, body, 5 if self._gzip else 0)

    def check(self) -> bool:
        """Whether `/ping` answers 204 within a couple of seconds (a separate connection: thread-safe)."""
        conn = self._http.connect(min(self._timeout, 2.0))
        try:
            conn.request("GET", f"{self._base}/ping")
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as exc:
            log.debug("ping %s failed: %s", self.url, exc)
            return False
        finally:
            conn.close()
        return resp.status == 204

    def close(self) -> None:
        """Close the kept-alive connection."""
        self._http.close()


def _error_text(answer: bytes) -> str:
    """The `error` (1.x) or `message` (2.x) of an InfluxDB JSON answer, else the shortened body."""
    try:
        decoded = json.loads(answer)
    except ValueError:
        return _short(answer)
    if isinstance(decoded, dict):
        for key in ("error", "message"):
            if isinstance(decoded.get(key), str):
                return _short(decoded[key])
    return _short(answer)


def _utc_stamp(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    return dt.strftime("%Y%m%dT%H%M%S") + f".{ms % 1000:03d}Z"


def import_commands(database: str) -> tuple[str, str]:
    """How to import one of the file sink's files F: into InfluxDB 2.x (bucket B), and into InfluxDB 1.x."""
    return (
        "influx write --bucket B --precision ms --file F",
        f"influx -execute 'CREATE DATABASE \"{database}\"' && influx -import -path=F -precision=ms",
    )


def file_header(database: str) -> str:
    """The comment lines each file of the file sink starts with.

    InfluxDB 1.x's `influx -import` needs `# DML` and takes the database from `# CONTEXT-DATABASE:`; line protocol
    parsers (InfluxDB 1.x and 2.x `/write` and `influx write`, VictoriaMetrics) skip lines that start with `#`.
    """
    v2, v1 = import_commands(database)
    return (
        "# Line protocol from the telemetry hub, timestamps in ms. Import this file F with\n"
        f"# InfluxDB 2.x: {v2}\n"
        f"# InfluxDB 1.x: {v1}\n"
        "# DML\n"
        f"# CONTEXT-DATABASE: {database}\n"
    )


class FileSink:
    """The embedded default sink: appends line protocol to `lines-<UTC time>.lp` files, fsynced per write.

    Each file starts with `file_header(database)`, so that both `influx write` (2.x) and `influx -import` (1.x) take
    it as it is. A new file starts when the current one would pass `max_bytes` or is older than `max_age_s`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int = 64 * 2**20,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        database: str = "telemetry",
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.header = file_header(database).encode()
        self._clock = clock
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0  # bytes in the current file, header included
        self._opened_at = 0.0
        self._last_ms = 0
        v2, v1 = import_commands(database)
        self.description = f"line-protocol files in {self.directory} (import a file F: InfluxDB 2.x: {v2}; 1.x: {v1})"

    @property
    def current_file(self) -> Path | None:
        """The file being appended to, if any."""
        return self._path

    def _open_new(self) -> None:
        self._close_file()
        # Names sort in write order: a name already taken moves on by a millisecond.
        ms = max(int(time.time() * 1000), self._last_ms + 1)
        while (path := self.directory / f"lines-{_utc_stamp(ms)}.lp").exists():
            ms += 1
        self._last_ms = ms
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
        try:
            _write_all(fd, self.header)  # made durable by the fsync of the first write
            fsync_dir(self.directory)  # the new directory entry must survive a crash too
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self._path = path
        self._size = len(self.header)
        self._opened_at = self._clock()
        log.info("file sink: writing %s", path)

    def write(self, body: str) -> None:
        """Append and fsync; a failed write is cut back off the file and raises `SinkUnavailable`."""
        data = body.encode()
        try:
            if (
                self._fd is None
                or (self._size > len(self.header) and self._size + len(data) > self.max_bytes)
                or self._clock() - self._opened_at >= self.max_age_s
            ):
                self._open_new()
            assert self._fd is not None
            try:
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError:
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError as exc:
                    log.error("file sink: cannot cut a failed write off %s: %s", self._path, exc)
                raise
        except OSError as exc:
            raise SinkUnavailable(f"file sink {self.directory}: {exc}") from exc
        self._size += len(data)

    def check(self) -> bool:
        """Whether the directory is writable."""
        return os.access(self.directory, os.W_OK)

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the current file."""
        self._close_file()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
