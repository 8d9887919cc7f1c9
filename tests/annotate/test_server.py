"""The HTTP API of `stm annotate` (stm_model.annotate.server): every endpoint, the bad inputs,
cancelling, saving and continuing, exporting, and the command itself."""
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_frames
from stm_model import io as video_io
from stm_model.annotate.server import MAX_BODY_BYTES, AnnotationServer
from stm_model.interactive.session import InteractiveSession

FRAMES, SIZE = 8, (64, 96)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A folder of FRAMES PNG frames and their (T, 3, H, W) tensor as the server reads it."""
    folder = tmp_path_factory.mktemp("video") / "frames"
    write_frames(folder, FRAMES, SIZE)
    tensor = torch.stack([frame.tensor for frame in video_io.FrameReader(folder)])
    return folder, tensor


@pytest.fixture
def server(video, model, tmp_path):
    server = AnnotationServer(video[0], tmp_path / "out", model, num_objects=2)
    server.start()
    yield server
    server.stop()


def call(server, path, body=None, raw=None):
    """(status, decoded JSON or bytes) of a GET (no body) or POST, as the page sends them
    (the token, a JSON body)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.address + path, data=data,
                                     method="GET" if data is None else "POST",
                                     headers={"Authorization": f"token {server.token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, content = response.status, response.read()
            kind = response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        status, content, kind = error.code, error.read(), error.headers["Content-Type"]
    return status, json.loads(content) if kind == "application/json" else content


def strokes(frame=0, object_id=1, path=((0.2, 0.3), (0.35, 0.45), (0.3, 0.6))):
    scribbles = [[] for _ in range(FRAMES)]
    scribbles[frame] = [{"path": [list(point) for point in path], "object_id": object_id,
                         "start_time": 0.0, "end_time": 1.0}]
    return {"sequence": "frames", "scribbles": scribbles}


def run_round(server, scribbles):
    status, reply = call(server, "/api/round", scribbles)
    assert status == 202, reply
    server.wait()
    status, progress = call(server, "/api/progress")
    assert progress["error"] is None and not progress["running"], progress
    return reply["round"]


def page_mask(server, t):
    status, content = call(server, f"/api/masks/{t}.png")
    assert status == 200
    return np.array(Image.open(io.BytesIO(content)))


def test_session_frames_and_the_page(server):
    status, state = call(server, "/api/session")
    assert status == 200
    assert (state["num_frames"], state["height"], state["width"]) == (FRAMES,) + SIZE
    assert state["num_objects"] == 2 and state["rounds"] == [] and not state["has_masks"]
    assert state["palette"][1] == video_io.DAVIS_PALETTE[1].tolist()
    status, jpeg = call(server, "/api/frames/3.jpg")
    assert status == 200 and Image.open(io.BytesIO(jpeg)).size == (SIZE[1], SIZE[0])
    status, page = call(server, "/")
    assert status == 200 and b"<html" in page.lower()
    assert call(server, "/static/app.js")[0] == 200


@pytest.mark.parametrize("path", ["/api/frames/8.jpg", "/api/frames/-1.jpg", "/api/frames/x.jpg",
                                  "/api/masks/0.png", "/api/frames/1.png", "/nothing",
                                  "/static/../server.py", "/static/..%2fserver.py",
                                  "/static/%2e%2e/server.py", "/api/frames/..%2f..%2fetc",
                                  "/static//etc/passwd"])
def test_only_the_videos_frames_and_the_static_files_are_served(server, path):
    status, reply = call(server, path)
    assert status == 404, (path, reply)  # JSON for the API, plain text for a page
    assert "error" in reply if path.startswith("/api/") else b"no such" in reply, reply


def test_a_round_gives_the_masks_of_interactive_session(server, video, model):
    """A round from the page's strokes: progress reaches every frame, the masks the page gets
    are InteractiveSession's for the same scribbles, and the session lists the round."""
    scribbles = strokes()
    assert run_round(server, scribbles) == 1
    expected = InteractiveSession(model, video[1], 2).interact(scribbles).numpy()
    for t in range(FRAMES):
        np.testing.assert_array_equal(page_mask(server, t), expected[t])
    state = call(server, "/api/session")[1]
    assert [r["annotated_frames"] for r in state["rounds"]] == [[0]] and state["has_masks"]
    assert state["progress"]["done"] == state["progress"]["total"] == FRAMES
    assert state["scribbles"]["scribbles"][0] == scribbles["scribbles"][0]
    # a second round refines: the fused scribbles hold both rounds' strokes
    second = strokes(frame=5, object_id=2, path=((0.6, 0.5), (0.7, 0.6)))
    assert run_round(server, second) == 2
    session = InteractiveSession(model, video[1], 2)
    session.interact(scribbles)
    expected = session.interact(second).numpy()
    np.testing.assert_array_equal(page_mask(server, 5), expected[5])
    assert len(call(server, "/api/session")[1]["scribbles"]["scribbles"][0]) == 1


@pytest.mark.parametrize("body, fragment", [
    ([1, 2], "scribbles must be a dict"),
    ({"scribbles": [[]] * 3}, "3 frame entries but the video has 8"),
    (strokes(object_id=3), "object"),
    (strokes(path=((1.5, 0.2),)), "[0, 1]"),
    ({"scribbles": [[] for _ in range(FRAMES)]}, "no stroke"),
])
def test_malformed_scribbles_are_a_400_the_page_can_show(server, body, fragment):
    status, reply = call(server, "/api/round", body)
    assert status == 400 and fragment in reply["error"], reply


def test_bad_bodies_and_sizes(server):
    status, reply = call(server, "/api/round", raw=b"{not json")
    assert status == 400 and "not JSON" in reply["error"]
    for count, fragment in ((0, "at least one object"), (33, "at most 32 objects"),
                            ("3", "an integer"), (True, "an integer")):
        status, reply = call(server, "/api/objects", {"num_objects": count})
        assert status == 400 and fragment in reply["error"], count
    assert call(server, "/api/objects", {})[0] == 400
    host, port = server.address.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/api/round")
    connection.putheader("Authorization", f"token {server.token}")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()  # the server answers from the header, before any body
    response = connection.getresponse()
    assert response.status == 413 and b"at most" in response.read()
    connection.close()


def test_objects_are_added_any_time_and_removed_only_before_the_first_round(server):
    assert call(server, "/api/objects", {"num_objects": 3})[1]["num_objects"] == 3
    assert call(server, "/api/objects", {"num_objects": 2})[1]["num_objects"] == 2
    run_round(server, strokes())
    status, reply = call(server, "/api/objects", {"num_objects": 1})
    assert status == 400 and "before the first round" in reply["error"]
    assert call(server, "/api/objects", {"num_objects": 3})[0] == 200
    run_round(server, strokes(frame=2, object_id=3, path=((0.7, 0.7), (0.8, 0.8))))
    assert call(server, "/api/session")[1]["num_objects"] == 3


def test_a_second_round_while_one_runs_is_a_409_and_a_round_can_be_cancelled(server):
    gate, real = threading.Event(), server._progress

    def held(done, total):  # the round waits here until the test lets it go
        gate.wait(30)
        real(done, total)
    server._progress = held
    assert call(server, "/api/round", strokes())[0] == 202
    status, reply = call(server, "/api/round", strokes())
    assert status == 409 and "already running" in reply["error"]
    assert call(server, "/api/progress")[1]["running"]
    assert call(server, "/api/cancel", {})[0] == 200
    gate.set()
    server.wait()
    progress = call(server, "/api/progress")[1]
    assert not progress["running"] and progress["stage"] == "cancelled"
    assert call(server, "/api/session")[1]["rounds"] == []  # the cancelled round is not kept
    assert call(server, "/api/masks/0.png")[0] == 404
    status, reply = call(server, "/api/cancel", {})
    assert status == 409 and "no round" in reply["error"]
    server._progress = real
    assert run_round(server, strokes()) == 1  # the session is rebuilt for the next round


def test_the_rounds_are_saved_and_a_new_server_continues_them(video, model, tmp_path):
    first = AnnotationServer(video[0], tmp_path / "out", model, num_objects=2)
    first.start()
    try:
        run_round(first, strokes())
        run_round(first, strokes(frame=4, object_id=2, path=((0.6, 0.6), (0.7, 0.5))))
        before = [page_mask(first, t) for t in range(FRAMES)]
    finally:
        first.stop()
    saved = json.loads((tmp_path / "out" / ".stm_annotate" / "session.json").read_text())
    assert len(saved["rounds"]) == 2 and saved["num_objects"] == 2
    again = AnnotationServer(video[0], tmp_path / "out", model)
    assert again.continued and len(again.rounds) == 2 and again.num_objects == 2
    again.start()  # replays the saved rounds
    try:
        again.wait()
        assert call(again, "/api/session")[1]["continued"]
        for t in range(FRAMES):
            np.testing.assert_array_equal(page_mask(again, t), before[t])
        assert run_round(again, strokes(frame=6)) == 3
    finally:
        again.stop()
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "00000.png")
    with pytest.raises(ValueError, match="annotation session of another video"):
        AnnotationServer(other, tmp_path / "out", model)


def test_export_writes_masks_scribbles_and_an_overlay(server, video):
    status, reply = call(server, "/api/export", {})
    assert status == 400 and "run a round first" in reply["error"]
    run_round(server, strokes())
    status, reply = call(server, "/api/export", {})
    assert status == 200
    output = server.output
    masks = sorted((output / "masks").glob("*.png"))
    assert [path.name for path in masks] == [f"{t:05d}.png" for t in range(FRAMES)]
    for t, path in enumerate(masks):
        np.testing.assert_array_equal(video_io.read_mask(path), page_mask(server, t))
    rounds = json.loads((output / "scribbles" / "round_001.json").read_text())
    assert rounds["scribbles"][0] == strokes()["scribbles"][0]
    overlay = [path for path in map(__import__("pathlib").Path, reply["files"])
               if path.name.startswith("overlay")]
    assert len(overlay) == 1 and overlay[0].stat().st_size > 0
    assert all(os.path.commonpath([output, path]) == str(output) for path in reply["files"])


def test_the_server_listens_on_this_machine_only_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stm_annotate_serves_until_ctrl_c_and_refuses_bad_input(video, tmp_path, stop):
    """The command prints the URL, serves the page, and stops on Ctrl-C (SIGINT, even when
    started as a background job, which ignores it) or SIGTERM with a line saying where the
    session is; bad input is a one-line error before any model loads."""
    command = [sys.executable, "-m", "stm_model", "annotate", str(video[0]), "--output",
               str(tmp_path / "out"), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        line = process.stdout.readline()
        assert "stm annotate: open http://127.0.0.1:" in line, (line, process.stderr.read())
        url = line.split("open ")[1].split()[0]
        address, token = url.split("/?token=")
        request = urllib.request.Request(address + "/api/session",
                                         headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["num_frames"] == FRAMES
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopped; the rounds are saved in" in out
    for argv, fragment in ([str(tmp_path / "missing")], "no such folder"), (
            [str(video[0]), "--output", str(video[0] / "00000.png")], "is a file"), (
            [str(video[0]), "--port", "-1"], "--port must be at least 0"), (
            [str(video[0]), "--port", "99999"], "--port must be a port number, 0..65535"), (
            [str(video[0]), "--objects", "40"], "--objects must be at most 32"), (
            [str(video[0]), "--bogus"], "(see stm annotate --help)"):
        completed = subprocess.run([sys.executable, "-m", "stm_model", "annotate", *argv],
                                   capture_output=True, text=True, timeout=120)
        assert completed.returncode == 2 and fragment in completed.stderr, completed.stderr
        assert "Traceback" not in completed.stderr


def test_a_port_in_use_is_a_user_error(video, tmp_path, server):
    port = server.address.rsplit(":", 1)[1]
    completed = subprocess.run([sys.executable, "-m", "stm_model", "annotate", str(video[0]),
                                "--output", str(tmp_path / "o"), "--port", port],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and f"--port {port}" in completed.stderr, completed.stderr


# ----------------------------------------------------------------------------- attacks


def raw_request(server, method, path, headers=(), body=b""):
    """(status, headers, body) of a request sent with exactly these headers (http.client adds
    Host unless it is given)."""
    host, port = server.address.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    names = {name.lower() for name, _ in headers}
    connection.putrequest(method, path, skip_host="host" in names,
                          skip_accept_encoding=True)
    for name, value in headers:
        connection.putheader(name, value)
    if body or method == "POST":
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body or None)
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def token_header(server):
    return ("Authorization", f"token {server.token}")


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/static/app.js"), ("GET", "/api/session"),
    ("GET", "/api/frames/0.jpg"), ("POST", "/api/objects"), ("POST", "/api/export")])
@pytest.mark.parametrize("credential", [None, "wrong token", "wrong cookie", "empty"])
def test_without_the_token_nothing_is_served_or_changed(server, method, path, credential):
    headers = [("Content-Type", "application/json")]
    if credential == "wrong token":
        headers.append(("Authorization", "token " + "x" * len(server.token)))
    elif credential == "wrong cookie":
        headers.append(("Cookie", f"{server.guard.cookie_name}=not-the-token"))
    elif credential == "empty":
        path += "?token="
    status, _, content = raw_request(server, method, path, headers,
                                     b'{"num_objects": 5}' if method == "POST" else b"")
    assert status == 403 and b"token" in content, (status, content)
    assert server.num_objects == 2 and not (server.output / "masks").exists()


def test_the_token_of_the_url_becomes_a_strict_cookie_and_leaves_the_address(server):
    status, headers, _ = raw_request(server, "GET", f"/?token={server.token}")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"{server.guard.cookie_name}={server.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    with_cookie = [("Cookie", f"{server.guard.cookie_name}={server.token}")]
    status, headers, page = raw_request(server, "GET", "/", with_cookie)
    assert status == 200 and b"<html" in page.lower()
    assert raw_request(server, "GET", "/api/session", with_cookie)[0] == 200
    # another server's cookie (another port of the same host) does not open this one
    other = [("Cookie", f"stm_annotate_1={server.token}x")]
    assert raw_request(server, "GET", "/api/session", other)[0] == 403


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("[::1]:{port}", True),
    ("10.1.2.3:{port}", True), ("evil.example:{port}", False), ("evil.example", False),
    ("127.0.0.1.evil.example:{port}", False), (None, False)])
def test_a_host_header_that_is_not_this_server_is_refused(server, host, allowed):
    """DNS rebinding: a site's page, its domain resolved to 127.0.0.1, sends its own name."""
    port = server.address.rsplit(":", 1)[1]
    headers = [token_header(server)]
    headers.append(("Host", host.format(port=port)) if host else ("Host", ""))
    status, _, content = raw_request(server, "GET", "/api/session", headers)
    assert (status == 200) == allowed, (host, status, content)
    if not allowed:
        assert b"Host" in content


@pytest.mark.parametrize("headers, status", [
    ([("Content-Type", "text/plain")], 415),               # no preflight: a site's fetch
    ([("Content-Type", "application/x-www-form-urlencoded")], 415),  # a site's form
    ([], 415),
    ([("Content-Type", "application/json"), ("Origin", "http://127.0.0.1:1")], 403),
    ([("Content-Type", "application/json"), ("Origin", "null")], 403),
    ([("Content-Type", "application/json"), ("Sec-Fetch-Site", "same-site")], 403),
    ([("Content-Type", "application/json"), ("Sec-Fetch-Site", "cross-site")], 403),
    ([("Content-Type", "application/json"), ("Origin", "{origin}"),
      ("Sec-Fetch-Site", "same-origin")], 200),
])
def test_state_changes_come_only_from_the_page_with_json(server, headers, status):
    headers = [(name, value.format(origin=server.address)) for name, value in headers]
    got, response_headers, content = raw_request(
        server, "POST", "/api/objects", [token_header(server), *headers],
        b'{"num_objects": 3}')
    assert got == status, content
    assert server.num_objects == (3 if status == 200 else 2)
    assert not any(name.lower().startswith("access-control") for name in response_headers)


def test_no_cors_and_no_preflight(server):
    status, headers, _ = raw_request(server, "OPTIONS", "/api/objects", [
        token_header(server), ("Origin", "http://127.0.0.1:1"),
        ("Access-Control-Request-Method", "POST")])
    assert status in (405, 501)
    assert not any(name.lower().startswith("access-control") for name in headers)


def test_a_deeply_nested_body_is_a_400_with_a_message(server):
    status, reply = call(server, "/api/round", raw=b"[" * 200_000 + b"]" * 200_000)
    assert status == 400 and "nested too deeply" in reply["error"]
    assert call(server, "/api/session")[0] == 200  # the server goes on


def test_a_client_that_hangs_up_leaves_no_traceback(server, capfd):
    """A dropped request (ConnectionError while answering) is not reported; any other error
    still is."""
    from stm_model.annotate.server import _HTTPServer
    for error, reported in ((BrokenPipeError(32, "Broken pipe"), False),
                            (ConnectionResetError(104, "reset"), False),
                            (RuntimeError("a bug"), True)):
        try:
            raise error
        except Exception:
            _HTTPServer.handle_error(server._httpd, None, ("127.0.0.1", 1))
        assert ("Traceback" in capfd.readouterr().err) == reported, error


def test_a_server_on_every_interface_prints_an_address_a_browser_opens(video, model, tmp_path):
    server = AnnotationServer(video[0], tmp_path / "out", model, host="0.0.0.0")
    try:
        assert server.url.startswith("http://127.0.0.1:") and "/?token=" in server.url
    finally:
        server.stop()


def test_export_never_replaces_another_runs_results(video, model, tmp_path, capsys):
    """`stm segment CLIP` then `stm annotate CLIP` default to one folder: the page's export
    refuses a folder holding another run's masks (409, nothing written) and the command
    refuses it before any model loads; the session's own earlier export is replaced."""
    from stm_model.cli import main
    output = tmp_path / "out"
    (output / "masks").mkdir(parents=True)
    video_io.write_mask(output / "masks" / "00000.png", np.ones(SIZE, np.uint8))
    before = (output / "masks" / "00000.png").read_bytes()
    server = AnnotationServer(video[0], output, model, num_objects=2)
    server.start()
    try:
        run_round(server, strokes())
        status, reply = call(server, "/api/export", {})
        assert status == 409 and "another run's results (1 mask)" in reply["error"]
        assert (output / "masks" / "00000.png").read_bytes() == before
        assert sorted(p.name for p in (output / "masks").iterdir()) == ["00000.png"]
    finally:
        server.stop()
    capsys.readouterr()
    assert main(["annotate", str(video[0]), "--output", str(output), "--port", "0"]) == 2
    assert "holds another run's results (1 mask)" in capsys.readouterr().err
    clean = tmp_path / "clean"
    server = AnnotationServer(video[0], clean, model, num_objects=2)
    server.start()
    try:
        run_round(server, strokes())
        assert call(server, "/api/export", {})[0] == 200
        assert call(server, "/api/export", {})[0] == 200  # its own files: replaced
    finally:
        server.stop()
