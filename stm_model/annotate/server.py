"""The server of `stm annotate`: one video, one InteractiveSession, the page and a JSON API.

    server = AnnotationServer("frames/", "out/")    # the shipped small-real-interactive model
    server.start()                                   # serves on a background thread
    print(server.url)                                # http://127.0.0.1:PORT/?token=SECRET
    ...
    server.stop()

Only the person who started it can use it (stm_model.annotate.security: the token of the
URL, the Host, Origin and Content-Type checks, as Jupyter's).

The page (static/) draws scribbles and sends each round's new strokes in the DAVIS scribble
format; a round runs on a worker thread (one at a time) while the page polls its progress
(frames done of total); a round can be cancelled. The server keeps the state (rounds,
scribbles, the masks of the last round), so a page reload shows it again, and writes the
rounds to OUTPUT/.stm_annotate/session.json atomically after each one: a server killed
mid-round loses that round only, and a new server on the same output folder replays the saved
rounds (the model is deterministic: the same masks) and goes on.

Only the video's frames and the static files are served, by index or from a fixed list of
names, never by a path taken from the request; files are written only into the output folder.
Request bodies are bounded (MAX_BODY_BYTES) and every malformed one is a 400 with a message; a
client that hangs up mid-answer is not an error.
"""
import http.server
import io
import json
import pathlib
import re
import sys
import threading
import time
import urllib.parse
from typing import Optional

import numpy as np
import torch
from PIL import Image

from stm_model import io as video_io
from stm_model.annotate.security import Guard, Refused, browsable_host, new_token
from stm_model.commands.common import (DEFAULT_INTERACTIVE_CHECKPOINT, describe_results,
                                        earlier_results)
from stm_model.io.files import note_written
from stm_model.inference.resize import internal_size
from stm_model.interactive import scribbles as scribble_format
from stm_model.interactive.session import InteractiveSession
from stm_model.network.checkpoint import load_checkpoint, resolve_checkpoint

STATIC = pathlib.Path(__file__).resolve().parent / "static"
STATE_FOLDER = ".stm_annotate"  # in the output folder: what a new server continues from
EXPORTED = "exported.txt"  # in STATE_FOLDER: the files the last export wrote
DISPLAY_SIZE = 480  # frames and masks are sent with their shorter side at most this
MAX_BODY_BYTES = 4 << 20  # a round's strokes are a few kB; anything this large is refused
MAX_OBJECTS = 32
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png"}


class RequestError(ValueError):
    """A request the server refuses: its HTTP status and a message for the page (a
    ValueError: a bad num_objects given to the constructor is the same error)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class RoundCancelled(Exception):
    """Raised from a round's progress callback when the page asked to cancel it."""


class AnnotationServer:
    """Interactive segmentation of one video from a browser page (see the module docstring).

    Args:
        video: a folder of frames (JPEG/PNG) or a video file.
        output: the folder export writes into (masks/, scribbles/, the overlay), and where the
            session is saved (.stm_annotate/); made if needed.
        model: an interactive STM (None: the shipped small-real-interactive model).
        port: the port to listen on (0: any free one; see `url`).
        host: the address to listen on; 127.0.0.1 keeps the page to this machine.
        max_internal_size: the session segments frames resized so that their shorter side is
            at most this (InteractiveSession's); masks come back at the frames' size.
        num_objects: objects at the start (the page adds and removes them).
        device: where the model runs (with model None).
        token: the secret of `url` (None: a fresh random one; see security).
        memory_dtype: the session's memory dtype (InteractiveSession's; None: the model's).
    """

    def __init__(self, video, output, model=None, *, port: int = 0, host: str = "127.0.0.1",
                 max_internal_size: Optional[int] = None, num_objects: int = 1,
                 device="cpu", token: Optional[str] = None,
                 memory_dtype: Optional[str] = None) -> None:
        reader = video_io.FrameReader(video)
        if reader.paths is not None:
            video_io.check_complete(reader.paths)
        self.video = pathlib.Path(video)
        self.frames = list(reader)
        self.fps = reader.fps or 24.0
        self.output = pathlib.Path(output)
        self.model = model if model is not None else load_checkpoint(
            resolve_checkpoint(DEFAULT_INTERACTIVE_CHECKPOINT), device)
        self.max_internal_size = max_internal_size
        self.memory_dtype = memory_dtype
        self.display_size = internal_size(self.frames[0].hw, DISPLAY_SIZE)
        self.num_objects = _checked_count(num_objects)
        self.rounds: list = []  # {"scribbles", "annotated_frames", "seconds"} per round
        self.session: Optional[InteractiveSession] = None
        self.labels: Optional[np.ndarray] = None  # (T, H, W) uint8 of the last round
        self.masks_version = 0  # counts the changes of self.labels: the page's cache key
        self.progress = dict(running=False, done=0, total=0, round=0, stage="", error=None)
        self.continued = self._load_saved()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._jpegs: dict = {}
        self._masks: dict = {}
        self.token = token or new_token()
        self._httpd = _HTTPServer((host, port), _handler_for(self))
        self.guard = Guard(self.token, host, self._httpd.server_address[1])
        self._serving: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        """http://HOST:PORT of the server, HOST an address a browser can open (this machine's
        loopback address for a server on every interface)."""
        host, port = self._httpd.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{browsable_host(host)}:{port}"

    @property
    def url(self) -> str:
        """The page's URL with the token: what its user opens."""
        return f"{self.address}/?token={self.token}"

    def start(self) -> None:
        """Serve on a background thread; a continued session's rounds are replayed first (on
        the worker, with progress, as a round is run)."""
        self._serving = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._serving.start()
        if self.rounds:
            self._start_worker(None)

    def stop(self) -> None:
        """Stop serving and cancel a running round."""
        self._cancel.set()
        if self._serving is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        if self._worker is not None:
            self._worker.join()

    def wait(self) -> None:
        """Block until the worker is idle (a round or the replay finished)."""
        worker = self._worker
        if worker is not None:
            worker.join()

    # ------------------------------------------------------------------------ the API

    def state(self) -> dict:
        """The session as the page needs it (GET /api/session)."""
        with self._lock:
            height, width = self.display_size
            return dict(
                video=self.video.name, num_frames=len(self.frames), width=width, height=height,
                num_objects=self.num_objects,
                palette=video_io.DAVIS_PALETTE[:MAX_OBJECTS + 1].tolist(),
                rounds=[dict(round=index + 1, annotated_frames=r["annotated_frames"],
                             seconds=r["seconds"]) for index, r in enumerate(self.rounds)],
                scribbles=self._fused_scribbles(), has_masks=self.labels is not None,
                masks_version=self.masks_version, continued=self.continued,
                progress=dict(self.progress))

    def set_objects(self, count) -> dict:
        """POST /api/objects: the number of objects (removing one only before the first
        round: its masks and scribbles would have to go)."""
        count = _checked_count(count)
        with self._lock:
            if self.progress["running"]:
                raise RequestError(409, "a round is running: wait for it or cancel it")
            if count < self.num_objects and self.rounds:
                raise RequestError(400, "objects can be removed only before the first round")
            self.num_objects = count
            self._save()
        return self.state()

    def start_round(self, scribbles) -> int:
        """POST /api/round: check the strokes and run a round with them on the worker."""
        try:
            scribble_format.check_scribbles(scribbles, len(self.frames), self.num_objects)
        except scribble_format.ScribbleError as error:
            raise RequestError(400, f"scribbles: {error}") from None
        if not scribble_format.annotated_frames(scribbles):
            raise RequestError(400, "draw a scribble on a frame first (no stroke was sent)")
        with self._lock:
            if self.progress["running"]:
                raise RequestError(409, "a round is already running")
            self.progress.update(running=True, done=0, total=len(self.frames), error=None,
                                 round=len(self.rounds) + 1, stage="starting")
        self._start_worker(scribbles)
        return len(self.rounds) + 1

    def cancel(self) -> None:
        """POST /api/cancel: stop the running round (its masks are not kept)."""
        with self._lock:
            if not self.progress["running"]:
                raise RequestError(409, "no round is running")
        self._cancel.set()

    def frame_jpeg(self, index: int) -> bytes:
        """Frame `index` as JPEG at the display size (encoded once)."""
        if index not in self._jpegs:
            height, width = self.display_size
            image = Image.fromarray(self.frames[index].image)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            self._jpegs[index] = buffer.getvalue()
        return self._jpegs[index]

    def mask_png(self, index: int) -> bytes:
        """The last round's labels of frame `index` as a palette PNG at the display size."""
        with self._lock:
            labels, version = self.labels, self.masks_version
        if labels is None:
            raise RequestError(404, "no masks yet: run a round first")
        key = (version, index)
        if key not in self._masks:
            if any(cached != version for cached, _ in self._masks):
                self._masks = {}  # another round's
            height, width = self.display_size
            image = Image.fromarray(labels[index], mode="P")
            image.putpalette(video_io.DAVIS_PALETTE.astype(np.uint8).tobytes())
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.NEAREST)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self._masks[key] = buffer.getvalue()
        return self._masks[key]

    def export(self) -> list:
        """POST /api/export: palette PNG masks named like the frames (masks/), each round's
        scribbles (scribbles/round_NNN.json, the DAVIS format) and an overlay video (an MP4,
        or a GIF without PyAV); returns the paths written. Every file is written atomically.
        Refused (409) while the folder holds another run's results (foreign_results)."""
        with self._lock:
            if self.labels is None:
                raise RequestError(400, "nothing to export yet: run a round first")
            labels, rounds = self.labels, list(self.rounds)
        foreign = foreign_results(self.output)
        if foreign:
            raise RequestError(409, f"{self.output} holds another run's results "
                                    f"({describe_results(foreign)}); nothing was exported, so "
                                    "as not to replace them: start stm annotate with another "
                                    "--output")
        written = []
        for frame, mask in zip(self.frames, labels, strict=True):
            path = self.output / "masks" / f"{frame.name}.png"
            video_io.write_mask(path, mask)
            written.append(path)
        for index, record in enumerate(rounds):
            path = self.output / "scribbles" / f"round_{index + 1:03d}.json"
            _write_json(path, record["scribbles"])
            written.append(path)
        try:
            import av  # noqa: F401  (the video extra)
            overlay = self.output / "overlay.mp4"
        except ImportError:
            overlay = self.output / "overlay.gif"
        with video_io.OverlayWriter(overlay, fps=self.fps) as writer:
            for frame, mask in zip(self.frames, labels, strict=True):
                writer.add(frame.image, mask, name=frame.name)
        written.append(overlay)
        note_written(self.output, *written)
        names = sorted({path.relative_to(self.output).as_posix() for path in written})
        _write_text(self.output / STATE_FOLDER / EXPORTED, "".join(f"{n}\n" for n in names))
        return [str(path) for path in written]

    # ------------------------------------------------------------------------ rounds

    def _start_worker(self, scribbles):
        self._cancel.clear()
        with self._lock:
            self.progress.update(running=True, error=None)
        self._worker = threading.Thread(target=self._run, args=(scribbles,), daemon=True)
        self._worker.start()

    def _run(self, scribbles):
        """The worker: (re)build the session when it is missing or stale (replaying the saved
        rounds), then run the new round, if any; progress and errors go to self.progress."""
        try:
            session = self.session
            if session is None or session.num_objects != self.num_objects or \
                    len(session.rounds) != len(self.rounds):
                session = self._replayed()
            if scribbles is not None:
                self._set_progress(stage="segmenting", round=len(self.rounds) + 1)
                start = time.perf_counter()
                labels = session.interact(scribbles, progress=self._progress)
                record = dict(scribbles=scribbles, seconds=time.perf_counter() - start,
                              annotated_frames=scribble_format.annotated_frames(scribbles))
                with self._lock:
                    self.rounds.append(record)
                    self._set_labels(labels)
                    self._save()
            self.session = session
            self._set_progress(stage="done")
        except RoundCancelled:
            self.session = None  # part-way through a round: rebuilt for the next one
            self._set_progress(error=None, stage="cancelled")
        except Exception as error:  # shown on the page; the server goes on
            self.session = None
            self._set_progress(error=f"{type(error).__name__}: {error}", stage="failed")
        finally:
            self._set_progress(running=False)

    def _replayed(self):
        """A new session with the saved rounds replayed (their masks as they were)."""
        frames = torch.stack([frame.tensor for frame in self.frames])
        session = InteractiveSession(self.model, frames, self.num_objects,
                                     max_internal_size=self.max_internal_size,
                                     memory_dtype=self.memory_dtype,
                                     sequence=self.video.name)
        for index, record in enumerate(self.rounds):
            self._set_progress(stage=f"replaying round {index + 1} of {len(self.rounds)}",
                               round=index + 1)
            labels = session.interact(record["scribbles"], progress=self._progress)
            with self._lock:
                self._set_labels(labels)
        return session

    def _set_labels(self, labels):
        """A round's (T, H, W) labels become the masks shown (called with the lock held)."""
        self.labels = labels.numpy().astype(np.uint8)
        self.masks_version += 1

    def _progress(self, done, total):
        if self._cancel.is_set():
            raise RoundCancelled()
        self._set_progress(done=done, total=total)

    def _set_progress(self, **values):
        with self._lock:
            self.progress.update(values)

    # ------------------------------------------------------------------------ saved state

    def _fused_scribbles(self):
        fused = scribble_format.empty_scribbles(len(self.frames), self.video.name)
        for record in self.rounds:
            fused = scribble_format.fuse_scribbles(fused, record["scribbles"])
        return fused

    def _state_path(self):
        return self.output / STATE_FOLDER / "session.json"

    def _save(self):
        """The rounds and the object count, atomically (called with the lock held)."""
        _write_json(self._state_path(), dict(video=str(self.video.resolve()),
                                             num_objects=self.num_objects, rounds=self.rounds))

    def _load_saved(self) -> bool:
        """Take the saved session of this output folder, if any; ValueError when it belongs
        to another video or cannot be read."""
        path = self._state_path()
        if not path.is_file():
            return False
        unreadable = (f"the saved session {path} cannot be read ({{}}); remove {path.parent} "
                      "(or --restart) to start a new one")
        try:
            saved = json.loads(path.read_text())
        except (UnicodeDecodeError, ValueError) as error:
            raise ValueError(unreadable.format(error)) from None
        video = saved.get("video") if isinstance(saved, dict) else None
        if video != str(self.video.resolve()):
            raise ValueError(f"{self.output} holds the annotation session of another video "
                             f"({video}); choose another --output, or --restart")
        try:
            rounds, count = saved["rounds"], _checked_count(saved["num_objects"])
            for record in rounds:
                scribble_format.check_scribbles(record["scribbles"], len(self.frames), count)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(unreadable.format(error)) from None
        self.rounds, self.num_objects = rounds, count
        return True


def foreign_results(output) -> list:
    """The results in an output folder that no export of an annotation session there wrote
    (another run's masks, overlay or J&F files, e.g. `stm segment`'s): an export would replace
    them, so it is refused while there are any."""
    output = pathlib.Path(output)
    exported = output / STATE_FOLDER / EXPORTED
    ours = set(exported.read_text().splitlines()) if exported.is_file() else set()
    return [path for path in earlier_results(output)
            if path.relative_to(output).as_posix() not in ours]


def _checked_count(count):
    """The number of objects, or a 400 saying in plain words why not (the page shows it under
    its object buttons; `stm annotate --objects` says it too)."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise RequestError(400, f"num_objects must be an integer in 1..{MAX_OBJECTS}; got "
                                f"{count!r}")
    if count < 1:
        raise RequestError(400, "at least one object is needed")
    if count > MAX_OBJECTS:
        raise RequestError(400, f"at most {MAX_OBJECTS} objects; asked for {count}")
    return count


def _write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    video_io.write_atomically(path, lambda file: file.write(text.encode()))


def _write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    video_io.write_atomically(path, lambda file: file.write(json.dumps(payload).encode()))


# ---------------------------------------------------------------------------- HTTP


def _handler_for(server: AnnotationServer):
    """The request handler class of one AnnotationServer."""

    class Handler(_Handler):
        annotation = server
    return Handler


class _HTTPServer(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer that lets a client hang up without a traceback in the terminal."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the browser closed the tab or dropped the request: nothing to report
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes GET and POST to the AnnotationServer once its guard lets the request through;
    errors as JSON {"error": message} (plain text for a page)."""

    annotation: AnnotationServer
    server_version = "stm-annotate"

    def do_GET(self):  # noqa: N802 (http.server's name)
        self._respond(self._get)

    def do_POST(self):  # noqa: N802
        self._respond(self._post)

    def log_message(self, *args):  # the console shows the URL and errors, not every request
        pass

    def _respond(self, route):
        split = urllib.parse.urlsplit(self.path)
        path, extra = urllib.parse.unquote(split.path), {}
        try:
            if self.annotation.guard.check(self.command, self.headers, split.query):
                extra["Set-Cookie"] = self.annotation.guard.set_cookie()
                if self.command == "GET" and path in ("/", "/index.html"):
                    # the token leaves the address bar (and the history); the cookie holds it
                    extra["Location"] = path
                    raise RequestError(303, "the page is at " + path)
            status, content_type, body = route(path)
        except (RequestError, Refused) as error:
            status = error.status
            if path.startswith("/api/"):
                content_type, body = "application/json", json.dumps(
                    {"error": str(error)}).encode()
            else:
                content_type, body = "text/plain; charset=utf-8", f"{error}\n".encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store" if status != 200 or content_type in (
                "application/json", CONTENT_TYPES[".html"]) else "max-age=3600")
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:  # the client hung up: nobody to answer
            self.close_connection = True

    def _get(self, path):
        server = self.annotation
        if path in ("/", "/index.html"):
            return _static("index.html")
        if path.startswith("/static/"):
            return _static(path[len("/static/"):])
        if path == "/api/session":
            return _json(server.state())
        if path == "/api/progress":
            return _json(server.state()["progress"])
        match = re.fullmatch(r"/api/(frames|masks)/(\d{1,7})\.(jpg|png)", path)
        if match and (match[1], match[3]) in (("frames", "jpg"), ("masks", "png")):
            index = int(match[2])
            if index >= len(server.frames):
                raise RequestError(404, f"no frame {index}: the video has "
                                        f"{len(server.frames)} frames")
            if match[1] == "frames":
                return 200, "image/jpeg", server.frame_jpeg(index)
            return 200, "image/png", server.mask_png(index)
        raise RequestError(404, f"no such page: {path}")

    def _post(self, path):
        server = self.annotation
        body = self._body()
        if path == "/api/objects":
            return _json(server.set_objects(_field(body, "num_objects")))
        if path == "/api/round":
            return _json({"round": server.start_round(body)}, status=202)
        if path == "/api/cancel":
            server.cancel()
            return _json({"cancelled": True})
        if path == "/api/export":
            return _json({"files": server.export(), "output": str(server.output)})
        raise RequestError(404, f"no such action: {path}")

    def _body(self):
        """The request's JSON body (413 past MAX_BODY_BYTES, 400 when not JSON)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, "Content-Length must be a number") from None
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"the request is {length} bytes; at most {MAX_BODY_BYTES}")
        if length < 0:
            raise RequestError(400, "Content-Length must not be negative")
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(400, f"the request body is not JSON: {error}") from None
        except RecursionError:
            raise RequestError(400, "the request body is nested too deeply") from None


def _field(body, name):
    if not isinstance(body, dict) or name not in body:
        raise RequestError(400, f'expected a JSON object with "{name}"')
    return body[name]


def _json(payload, status=200):
    return status, "application/json", json.dumps(payload).encode()


def _static(name):
    """A file of static/ by its exact name (the folder's listing is the allow-list: no path
    from the request reaches the filesystem)."""
    files = {path.name: path for path in STATIC.iterdir() if path.is_file()}
    if name not in files:
        raise RequestError(404, f"no such file: {name}")
    path = files[name]
    return 200, CONTENT_TYPES.get(path.suffix, "application/octet-stream"), path.read_bytes()
