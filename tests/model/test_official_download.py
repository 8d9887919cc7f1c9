"""`--checkpoint official`: the authors' weights downloaded once into the user cache, from a
local HTTP server standing in for the real host (no network here): resumed after a cut,
checked before use, a wrong file deleted, offline reported in one line."""
import hashlib
import http.server
import socket
import threading

import pytest
import torch
from PIL import Image

from stm_model import load_official_checkpoint
from stm_model.cli import main
from stm_model.network import checkpoint
from stm_model.network.checkpoint import (CheckpointError, OfficialWeightsUnavailable,
                                          official_weights, ours_to_official)
from stm_model.network.stm import STM, STMConfig
from stm_model.training.synthetic import SyntheticVideo
from stm_model import io as video_io


@pytest.fixture(scope="module")
def official_bytes(tmp_path_factory):
    """An official-format STM_weights.pth (the released keys with 'module.', every shape;
    seeded values, in fp16 to keep the file at 78 MB)."""
    torch.manual_seed(0)
    state = STM(STMConfig()).state_dict()
    official = {f"module.{ours_to_official(name)}": tensor.half() if tensor.is_floating_point()
                else tensor for name, tensor in state.items()}
    path = tmp_path_factory.mktemp("official") / "STM_weights.pth"
    torch.save(official, path)
    return path.read_bytes()


class _Server:
    """Serves `body` at /STM_weights.pth with Range support; `cut_after` (bytes) drops the
    connection mid-body once; `ignore_range` answers every request with the whole file."""

    def __init__(self, body):
        self.body, self.cut_after, self.ignore_range = body, None, False
        self.ranges = []  # the Range header of each request (None: none)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                requested = self.headers.get("Range")
                server.ranges.append(requested)
                if self.path != "/STM_weights.pth":
                    self.send_error(404)
                    return
                start = 0
                if requested and not server.ignore_range:
                    start = int(requested.removeprefix("bytes=").rstrip("-"))
                    if start >= len(server.body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(server.body) - 1}/{len(server.body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(server.body) - start))
                self.end_headers()
                payload = server.body[start:]
                if server.cut_after is not None:
                    payload, server.cut_after = payload[:server.cut_after], None
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/STM_weights.pth"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """serve(body) -> a server at checkpoint.OFFICIAL_URL; the cache is tmp_path/cache."""
    monkeypatch.setenv(checkpoint.CACHE_ENV, str(tmp_path / "cache"))
    servers = []

    def start(body):
        server = _Server(body)
        servers.append(server)
        monkeypatch.setattr(checkpoint, "OFFICIAL_URL", server.url)
        return server
    yield start
    for server in servers:
        server.close()


def _closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/STM_weights.pth"  # nothing listens there now


def test_downloaded_once_checked_and_loaded(serve, official_bytes, tmp_path):
    server = serve(official_bytes)
    path = official_weights(show_progress=False)
    assert path == tmp_path / "cache" / "STM_weights.pth"
    assert path.read_bytes() == official_bytes
    assert sorted(p.name for p in path.parent.iterdir()) == \
        ["STM_weights.pth"]  # no partial file, no lock file left
    model = load_official_checkpoint("official")  # from the cache: no second request
    assert server.ranges == [None]
    served = torch.load(path, weights_only=True)
    ours = model.state_dict()
    assert torch.equal(ours["decoder.predict.weight"],
                       served["module.Decoder.pred2.weight"].float())
    assert torch.equal(ours["memory_encoder.mask_conv.weight"],
                       served["module.Encoder_M.conv1_m.weight"].float())


def test_a_cut_download_resumes_with_a_range_request(serve, official_bytes, tmp_path):
    server = serve(official_bytes)
    server.cut_after = len(official_bytes) // 3
    with pytest.raises(OfficialWeightsUnavailable) as caught:
        official_weights(show_progress=False)
    message = str(caught.value)
    assert "\n" not in message and server.url in message and "--checkpoint small-real" in message
    assert str(tmp_path / "cache" / "STM_weights.pth") in message and "run again" in message
    partial = tmp_path / "cache" / "STM_weights.pth.part"
    assert partial.stat().st_size == len(official_bytes) // 3
    assert _cache_files(tmp_path) == ["STM_weights.pth.part"]  # kept to resume; no lock
    assert not (tmp_path / "cache" / "STM_weights.pth").exists()
    path = official_weights(show_progress=False)
    assert server.ranges == [None, f"bytes={len(official_bytes) // 3}-"]
    assert hashlib.sha256(path.read_bytes()).digest() == \
        hashlib.sha256(official_bytes).digest()
    assert not partial.exists()


def test_a_server_that_ignores_the_range_sends_the_file_again(serve, official_bytes, tmp_path):
    server = serve(official_bytes)
    server.ignore_range = True
    partial = tmp_path / "cache" / "STM_weights.pth.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 1000)  # a stale part that must not be spliced onto
    assert official_weights(show_progress=False).read_bytes() == official_bytes
    assert server.ranges == ["bytes=1000-"]


def test_a_partial_file_longer_than_the_resource_starts_over(serve, official_bytes, tmp_path):
    server = serve(official_bytes)
    partial = tmp_path / "cache" / "STM_weights.pth.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * (len(official_bytes) + 5))
    assert official_weights(show_progress=False).read_bytes() == official_bytes
    assert server.ranges == [f"bytes={len(official_bytes) + 5}-", None]  # 416, then whole


@pytest.mark.parametrize("kind", ["another model", "truncated", "not a checkpoint"])
def test_a_wrong_or_truncated_file_is_deleted_and_named(serve, official_bytes, tmp_path, kind):
    if kind == "another model":
        buffer = tmp_path / "small.pth"
        torch.save(STM(STMConfig.small()).state_dict(), buffer)
        body = buffer.read_bytes()
    elif kind == "truncated":  # complete by its Content-Length, but cut (a broken mirror)
        body = official_bytes[:len(official_bytes) // 2]
    else:
        body = b"<html>Sign in to download</html>"
    serve(body)
    with pytest.raises(CheckpointError) as caught:
        official_weights(show_progress=False)
    message = str(caught.value)
    assert "\n" not in message and "was deleted" in message
    assert "missing keys" in message if kind == "another model" else "could not read" in message
    assert _cache_files(tmp_path) == []  # neither the file, a part nor a lock


def test_offline_is_one_line_naming_url_path_and_the_shipped_model(monkeypatch, tmp_path):
    monkeypatch.setenv(checkpoint.CACHE_ENV, str(tmp_path / "cache"))
    url = _closed_port_url()
    monkeypatch.setattr(checkpoint, "OFFICIAL_URL", url)
    with pytest.raises(OfficialWeightsUnavailable) as caught:
        load_official_checkpoint("official")
    message = str(caught.value)
    assert "\n" not in message and url in message and "--checkpoint small-real" in message
    assert str(tmp_path / "cache" / "STM_weights.pth") in message
    assert "run again" not in message  # nothing was received
    assert _cache_files(tmp_path) == []  # no empty STM_weights.pth.lock left behind


def test_a_file_put_there_by_hand_is_used(monkeypatch, official_bytes, tmp_path):
    monkeypatch.setenv(checkpoint.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "OFFICIAL_URL", _closed_port_url())
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "STM_weights.pth").write_bytes(official_bytes)
    assert load_official_checkpoint("official").config == STMConfig()


def test_processes_started_together_download_once(serve, official_bytes):
    server = serve(official_bytes)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(official_weights(
        show_progress=False))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1 and len(paths) == 3 and server.ranges == [None]


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(checkpoint.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert checkpoint.cache_dir() == tmp_path / "xdg" / "stm-kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert checkpoint.cache_dir() == tmp_path / "home" / ".cache" / "stm-kernels"
    monkeypatch.setenv(checkpoint.CACHE_ENV, str(tmp_path / "mine"))
    assert checkpoint.cache_dir() == tmp_path / "mine"


def _clip(tmp_path):
    """Three synthetic frames as JPEGs and the first frame's mask: (frames folder, mask)."""
    video = SyntheticVideo(7, 64, 96)
    folder = tmp_path / "clip"
    folder.mkdir()
    for t in range(3):
        image, labels = video.render(t)
        Image.fromarray((image * 255).astype("uint8")).save(folder / f"{t:05d}.jpg")
        if t == 0:
            video_io.write_mask(tmp_path / "first.png", labels.astype("uint8"))
    return folder, tmp_path / "first.png"


def test_stm_segment_checkpoint_official(serve, official_bytes, tmp_path, capsys):
    serve(official_bytes)
    frames, mask = _clip(tmp_path)
    code = main(["segment", str(frames), "--mask", str(mask), "--checkpoint", "official",
                 "--output", str(tmp_path / "out"), "--overlay", "none", "--quiet"])
    assert code == 0
    assert len(list((tmp_path / "out" / "masks").glob("*.png"))) == 3
    err = capsys.readouterr().err
    assert "synthetic" not in err  # the note is for the shipped small model only
    code = main(["segment", str(frames), "--mask", str(mask), "--checkpoint", "small",
                 "--output", str(tmp_path / "small"), "--overlay", "none", "--quiet"])
    assert code == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "synthetic" in line]
    assert len(notes) == 1 and "--checkpoint small-real" in notes[0]
    assert "--checkpoint official" in notes[0]


def test_stm_segment_checkpoint_official_offline_is_one_line_before_any_file(
        monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(checkpoint.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "OFFICIAL_URL", _closed_port_url())
    frames, mask = _clip(tmp_path)
    code = main(["segment", str(frames), "--mask", str(mask), "--checkpoint", "official",
                 "--output", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint small-real" in err[0] and "cannot download" in err[0]
    assert not (tmp_path / "out").exists()
    assert _cache_files(tmp_path) == []


@pytest.mark.parametrize("command", ["annotate", "interactive"])
def test_the_interactive_commands_take_checkpoint_official_too(monkeypatch, tmp_path, capsys,
                                                               command):
    """`stm annotate` and `stm interactive` resolve --checkpoint official the same way (offline
    here: the one line, before any file is written)."""
    monkeypatch.setenv(checkpoint.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "OFFICIAL_URL", _closed_port_url())
    frames, _ = _clip(tmp_path)
    extra = ["--port", "0"] if command == "annotate" else [
        "--scribbles", str(_scribbles(tmp_path))]
    code = main([command, str(frames), "--checkpoint", "official", "--output",
                 str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot download" in err[0], err
    assert not (tmp_path / "out").exists()


def _scribbles(tmp_path):
    import json
    from stm_model.interactive import scribbles as scribble_format
    scribbles = scribble_format.empty_scribbles(3)
    scribbles["scribbles"][0] = [{"path": [[0.2, 0.2], [0.5, 0.5]], "object_id": 1,
                                  "start_time": 0, "end_time": 1}]
    path = tmp_path / "round1.json"
    path.write_text(json.dumps(scribbles))
    return path


def test_a_refused_download_is_one_line_with_the_status(serve, monkeypatch, tmp_path):
    server = serve(b"unused")
    monkeypatch.setattr(checkpoint, "OFFICIAL_URL", server.url + "-moved")  # a 404 there
    with pytest.raises(OfficialWeightsUnavailable) as caught:
        official_weights(show_progress=False)
    message = str(caught.value)
    assert "HTTP 404" in message and "\n" not in message and "--checkpoint small-real" in message
    assert _cache_files(tmp_path) == []  # no part, no lock


def test_a_connection_cut_before_any_byte_leaves_no_empty_part(serve, official_bytes,
                                                                 tmp_path):
    server = serve(official_bytes)
    server.cut_after = 0
    with pytest.raises(OfficialWeightsUnavailable) as caught:
        official_weights(show_progress=False)
    assert "run again" not in str(caught.value)  # nothing received, nothing to continue
    assert _cache_files(tmp_path) == []
    assert official_weights(show_progress=False).read_bytes() == official_bytes
    assert server.ranges == [None, None]


def test_the_lock_file_goes_with_its_last_holder_and_waiters_relock(tmp_path):
    """The lock file is removed by its holder; a process that waited on the removed file
    does not then run beside a newcomer that locked a new file: it locks the new file too."""
    import time
    lock = tmp_path / "cache" / "STM_weights.pth.lock"
    entered, release, order = threading.Event(), threading.Event(), []

    def hold(name, until=None):
        with checkpoint._locked(lock):
            order.append(f"{name} in")
            entered.set()
            until.wait(5) if until is not None else time.sleep(0.3)
            order.append(f"{name} out")
    first = threading.Thread(target=hold, args=("first", release))
    first.start()
    assert entered.wait(5)
    waiter = threading.Thread(target=hold, args=("waiter",))
    waiter.start()
    time.sleep(0.2)  # the waiter now blocks on the file the first holder will remove
    release.set()
    first.join(5)
    newcomer = threading.Thread(target=hold, args=("newcomer",))  # finds no file: makes one
    newcomer.start()
    for thread in (waiter, newcomer):
        thread.join(10)
    assert len(order) == 6 and order[:2] == ["first in", "first out"]
    assert all(order[i].split()[0] == order[i + 1].split()[0] for i in range(0, 6, 2)), order
    assert not lock.exists()


def _cache_files(tmp_path):
    """The names in the cache folder (none if it is absent)."""
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []
