"""Resumable downloads over HTTP(S): the bytes go to a partial file that survives an
interruption and is continued with a Range request next time (as pip and torch.hub keep a
partial file, so a large checkpoint is not fetched twice on a flaky connection)."""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

_CHUNK = 1 << 20


class DownloadError(OSError):
    """A download that did not complete: unreachable host, refused, cut short. The partial
    file is kept for the next attempt to continue."""


def download(url: str, partial: str | os.PathLike, *, show_progress: bool = True,
             timeout: float = 60.0, description: str | None = None) -> Path:
    """Download ``url`` into the file ``partial``, continuing from the bytes already there.

    A server that honours the Range request (206) gets the rest appended; one that sends the
    whole file (200) starts it over; 416 (the partial file is as long as the resource, or
    longer) starts over once. Returns the path once the server's Content-Length (or
    Content-Range total) is reached, or once a response without a length ends cleanly; a
    tqdm progress bar on stderr counts the bytes when show_progress. Raises DownloadError
    (one line naming the cause) for anything that stops it; what arrived stays in
    ``partial`` (an empty one is removed)."""
    partial = Path(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        have = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "stm-kernels"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code == 416 and have and attempt == 0:  # nothing left, or a wrong file
                partial.unlink()
                continue
            raise DownloadError(f"HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", None) or error
            raise DownloadError(f"cannot reach the server: {reason}") from None
        try:
            with response:
                _receive(response, partial, have, show_progress, description or partial.name)
        except DownloadError:
            if partial.exists() and partial.stat().st_size == 0:
                partial.unlink()  # nothing received: no empty part file left behind
            raise
        return partial
    raise DownloadError("the server refused the range of the partial file twice")


def _receive(response, partial, have, show_progress, description):
    """Write the response body into partial (appended on 206), checking the length."""
    from tqdm.auto import tqdm

    resumed = response.status == 206 and have
    if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
        partial.unlink()  # continuing it would splice the wrong bytes: start over next time
        raise DownloadError("the server sent another range than the one asked for "
                            f"(Content-Range {response.headers.get('Content-Range')!r}); "
                            "the partial file is removed, run again to start over")
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    total = (have + length if resumed else length) if length is not None else None
    done = have if resumed else 0
    bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
               desc=description, disable=not show_progress, leave=False)
    try:
        with open(partial, "ab" if resumed else "wb") as file:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (http.client.IncompleteRead, OSError) as error:
                    raise DownloadError(f"the connection was cut after {_size(done)}: "
                                        f"{type(error).__name__}") from None
                if not chunk:
                    break
                file.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
    if total is not None and done < total:
        raise DownloadError(f"the connection was cut after {_size(done)} of {_size(total)}")


def _size(count):
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count} B"
