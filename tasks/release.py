"""Download benchmark release files once into a local cache.

Users fetch benchmark data from its public release rather than from this repository, so a task can
name a release URL pinned at a commit and the harness caches each file on first use. Writes are
atomic (a temporary file in the same folder, then a rename), so an interrupted download never
leaves a truncated file that a later, offline run would trust.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from harness.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
USER_AGENT = "realign (benchmark data download)"


class DownloadError(DataError):
    """A release file could not be downloaded (the message names the URL).

    `status` is the HTTP status when the server answered, None when it could not be reached:
    callers may give up on further downloads after the latter (most likely offline).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def cache_root() -> Path:
    """Where the harness caches downloads: $REALIGN_CACHE, else ~/.cache/realign (as organism.demo)."""
    return Path(os.environ.get("REALIGN_CACHE") or Path.home() / ".cache" / "realign")


def url_join(base: str, *parts: str) -> str:
    """Append path parts to a base URL, quoting each part (file names may hold spaces)."""
    return "/".join([base.rstrip("/"), *(urllib.parse.quote(p) for p in parts)])


def commit_in_url(url: str) -> str | None:
    """The 40-hex commit a raw-content URL is pinned to, if it names one."""
    match = re.search(r"/([0-9a-f]{40})(?:/|$)", url)
    return match.group(1) if match else None


def cache_key(url: str) -> str:
    """A folder name for one release: its pinned commit, else a hash of its URL."""
    return commit_in_url(url) or "url-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def download(url: str, dest: Path, *, timeout: float = 60.0, expect_prefix: bytes | None = None) -> Path:
    """Download `url` to `dest` atomically; raise DownloadError naming the URL on any failure.

    `expect_prefix` guards against saving an HTML error or login page under a data file's name.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                shutil.copyfileobj(response, out)
            out.flush()
            os.fsync(out.fileno())
        if expect_prefix is not None:
            with tmp.open("rb") as fh:
                head = fh.read(len(expect_prefix))
            if head != expect_prefix:
                raise DownloadError(f"download {url} did not return the expected file type (got {head[:16]!r}...)", 200)
        os.replace(tmp, dest)
    except DownloadError:
        raise
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"download {url} failed: HTTP {exc.code} {exc.reason}", exc.code) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"download {url} failed: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def cached(url: str, dest: Path, *, timeout: float = 60.0, expect_prefix: bytes | None = None) -> Path:
    """`dest` if it is already cached, else download it there first (a second run is offline)."""
    if dest.is_file():
        return dest
    return download(url, dest, timeout=timeout, expect_prefix=expect_prefix)
