"""HTTP(S) downloads into the store: resumable, verified, atomic.

The bytes go to NAME.partial; an interrupted download resumes from where it stopped with an
HTTP Range request; the file is renamed into place only after its size and SHA-256 match.
Standard library only (urllib), so nothing is installed to fetch a model.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from garagelm import __version__
from garagelm.errors import GarageError
from garagelm.store.local import offline
from garagelm.store.progress import report

CHUNK = 1 << 20


def huggingface_url(repo: str, file: str, revision: str = "main") -> str:
    base = os.environ.get("GARAGE_HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{base}/{repo}/resolve/{revision}/{file}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def download(
    url: str, dest: Path, sha256: str | None = None, size: int | None = None, quiet: bool = False
) -> Path:
    """Fetch url to dest (resuming dest.partial if present); verify size and SHA-256; rename."""
    if offline():
        raise GarageError(f"downloading {url} needs the network, and GARAGE_OFFLINE=1 forbids it")
    if size is not None and size < 0:
        raise GarageError(f"refusing {url}: the catalog gives a negative size ({size})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:
        partial.unlink()  # longer than the file can be: not a prefix of it
        have = 0
    if size is not None and have < size:
        free = shutil.disk_usage(dest.parent).free
        if free < size - have:
            raise GarageError(
                f"not enough disk space for {dest.name}: {(size - have) / 2**30:.2f} GiB still to download, "
                f"{free / 2**30:.2f} GiB free in {dest.parent}; free some space or set GARAGE_HOME to a larger disk"
            )
    if size is None or have < size:
        _fetch(url, partial, have, size, quiet)
    got = partial.stat().st_size
    if size is not None and got != size:
        raise GarageError(
            f"{url}: received {got} bytes, expected {size}; the transfer stopped early or the server "
            "sent a wrong length. Run the pull again to resume"
        )
    if sha256 is not None:
        report("verifying sha256 digest")
        digest = sha256_file(partial)
        if digest != sha256:
            partial.unlink()
            raise GarageError(
                f"checksum mismatch for {dest.name} from {url}: got {digest}, expected {sha256}; "
                "the download was removed, pull again"
            )
    os.replace(partial, dest)
    return dest


def _fetch(url: str, partial: Path, have: int, size: int | None, quiet: bool) -> None:
    headers = {"User-Agent": f"garagelm/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    token = os.environ.get("HF_TOKEN")
    if token and _same_host(url, huggingface_url("x/y", "z")):
        # only to the Hugging Face host itself, and not forwarded to where it redirects
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        resp = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the partial file may be complete
            return
        raise GarageError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise GarageError(
            f"cannot reach {url}: {getattr(e, 'reason', e)}; check the network or use a local file"
        ) from None
    with resp:
        if have and resp.status == 206:
            start = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if start != str(have):
                raise GarageError(
                    f"{url}: asked to resume at byte {have}, server answered {resp.headers.get('Content-Range')!r}"
                )
            mode = "ab"
        else:  # the server ignored the Range header: start over
            have, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else size
        if size is not None and total is not None and total > size:
            raise GarageError(f"{url}: server announces {total} bytes but the file has {size}; refusing")
        from tqdm import tqdm

        try:
            with (
                open(partial, mode) as out,
                tqdm(
                    total=total,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    desc=partial.name[:-8],
                    disable=quiet,
                    leave=False,
                ) as bar,
            ):
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                        raise GarageError(
                            f"{url}: connection lost after {out.tell()} bytes ({e}); pull again to resume"
                        ) from None
                    if not block:
                        break
                    if size is not None and out.tell() + len(block) > size:
                        raise GarageError(f"{url}: server sent more than the {size} bytes expected; refusing")
                    out.write(block)
                    bar.update(len(block))
                    report(f"downloading {partial.name[:-8]}", out.tell(), total)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise GarageError(
                    f"disk full while writing {partial}; free some space and pull again (the download resumes)"
                ) from None
            raise


def _same_host(a: str, b: str) -> bool:
    from urllib.parse import urlparse

    return urlparse(a).hostname is not None and urlparse(a).hostname == urlparse(b).hostname
