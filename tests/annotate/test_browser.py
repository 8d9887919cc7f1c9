"""`stm annotate` end to end in a real headless Chromium driven by Selenium: strokes drawn with
mouse events on the canvas, rounds run from the page, the masks the page shows compared with
InteractiveSession's for the same scribbles, export, reload, cancel and the errors the page
shows. Skipped where no Chromium and chromedriver are installed (.ci/run installs them)."""
import json
import os
import pathlib
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_frames
from stm_model import io as video_io
from stm_model.annotate.server import AnnotationServer
from stm_model.interactive.session import InteractiveSession
from tools import headless_chromium
from tools.headless_chromium import wait_for

pytest.importorskip("selenium")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

# The README's and docs/annotating.md's picture of the page: rewritten by the test when missing
# or with STM_UPDATE_SCREENSHOTS=1 (the round times it shows differ from run to run, so an
# ordinary run leaves the committed one alone and writes its own to a temporary folder).
SCREENSHOT = pathlib.Path(__file__).resolve().parents[2] / "docs" / "images" / "annotate.png"
FRAMES, SIZE = 6, (216, 288)  # the screenshot's video: large enough to see the masks


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    why = headless_chromium.missing()
    if why is not None:
        pytest.skip(why)
    driver = headless_chromium.headless_chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


@pytest.fixture
def serve(model, tmp_path):
    """serve(frames, size, objects) -> (AnnotationServer started on a free port, folder,
    ground-truth labels); stopped after the test."""
    servers = []

    def start(frames=FRAMES, size=SIZE, objects=1):
        folder = tmp_path / f"synthetic-{len(servers)}"
        labels = write_frames(folder, frames, size, seed=4, objects=2)
        server = AnnotationServer(folder, tmp_path / f"out{len(servers)}", model,
                                  num_objects=objects)
        server.start()
        servers.append(server)
        return server, folder, labels
    yield start
    for server in servers:
        server.stop()


def open_page(driver, server):
    driver.get(server.url)
    wait_for(driver, 'document.body.dataset.ready === "1"')


def body(driver, name):
    return driver.execute_script(f"return document.body.dataset.{name}")


def press(driver, *keys):
    ActionChains(driver).send_keys(*keys).perform()


def draw(driver, points):
    """A stroke of mouse events through `points` (x, y in frame pixels); returns where the page
    must have put them, normalised as the DAVIS format (x / (W - 1), y / (H - 1))."""
    at, (left, top, width, height, columns, rows) = headless_chromium.draw(
        driver, "frame-canvas", points)
    return [((x - left) * columns / width / (columns - 1), (y - top) * rows / height / (rows - 1))
            for x, y in at]


def through(labels, object_id, fraction=0.5):
    """Four points across object `object_id` of a (H, W) label map, on the row through its
    centre (a scribble a user would draw on it)."""
    rows, columns = np.nonzero(labels == object_id)
    row = int(np.median(rows))
    inside = np.sort(columns[rows == row])
    span = inside[-1] - inside[0]
    start = inside[0] + span * (1 - fraction) / 2
    return [(float(start + span * fraction * i / 3), float(row)) for i in range(4)]


def page_masks(driver, height, width):
    """(T, H, W) object ids of the masks the page shows, decoded from its pixels."""
    count = driver.execute_script("return window.stmAnnotate.masks.length")
    return np.stack([np.array(driver.execute_script(
        f"return window.stmAnnotate.maskLabels({t})")).reshape(height, width)
        for t in range(count)])


def pending(driver):
    return driver.execute_script("return window.stmAnnotate.pending")


def run_round(driver, round_number):
    driver.find_element(By.ID, "segment").click()
    wait_for(driver, f'document.body.dataset.round === "{round_number}" && '
                     'document.body.dataset.busy === "0"')


def severe_browser_errors(driver):
    """The page's script errors (a refused request the page reports is the network's, not
    one of these)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and entry.get("source") != "network"]


def test_two_objects_two_rounds_export_and_reload(browser, serve, model, tmp_path):
    """A user's session: a stroke on object 1, a second object added and scribbled, a stroke
    undone, a round; on a later frame a background correction and a stroke, a second round;
    the page's masks are InteractiveSession's for the strokes it sent; export writes them; a
    reload shows the session again."""
    server, folder, labels = serve()
    open_page(browser, server)
    assert body(browser, "frame") == "0" and not severe_browser_errors(browser)

    first = draw(browser, through(labels[0], 1))
    browser.find_element(By.ID, "add-object").click()
    wait_for(browser, "document.querySelectorAll('#objects button').length === 3")
    assert browser.execute_script("return window.stmAnnotate.brush") == 2  # the new object
    second = draw(browser, through(labels[0], 2))
    draw(browser, [(5, 5), (40, 40)])
    press(browser, "z")  # undo the last stroke
    assert [len(frame) for frame in pending(browser)] == [2] + [0] * (FRAMES - 1)
    run_round(browser, 1)

    sent = server.rounds[0]["scribbles"]["scribbles"]
    assert [stroke["object_id"] for stroke in sent[0]] == [1, 2] and not any(sent[1:])
    for stroke, drawn in zip(sent[0], (first, second), strict=True):
        np.testing.assert_allclose(stroke["path"], drawn, atol=1e-4)

    for _ in range(3):
        press(browser, Keys.ARROW_RIGHT)
    assert body(browser, "frame") == "3"
    press(browser, "0")  # the background brush: a negative scribble
    draw(browser, [(8, SIZE[0] - 10), (SIZE[1] // 3, SIZE[0] - 12)])
    press(browser, "1")
    draw(browser, through(labels[3], 1, fraction=0.3))
    run_round(browser, 2)
    assert not severe_browser_errors(browser)

    frames = torch.stack([frame.tensor for frame in video_io.FrameReader(folder)])
    session = InteractiveSession(model, frames, 2)
    for record in server.rounds:
        expected = session.interact(record["scribbles"]).numpy()
    shown = page_masks(browser, *SIZE)
    np.testing.assert_array_equal(shown, expected)
    assert set(np.unique(shown[0])) == {0, 1, 2}  # both objects found from the strokes
    update = os.environ.get("STM_UPDATE_SCREENSHOTS") == "1" or not SCREENSHOT.exists()
    screenshot = SCREENSHOT if update else tmp_path / SCREENSHOT.name
    screenshot.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(screenshot))
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.width >= 800

    browser.find_element(By.ID, "export").click()
    wait_for(browser, "document.body.dataset.exported")
    output = server.output
    for t in range(FRAMES):
        np.testing.assert_array_equal(video_io.read_mask(output / "masks" / f"{t:05d}.png"),
                                      expected[t])
    for index, record in enumerate(server.rounds):
        saved = json.loads((output / "scribbles" / f"round_{index + 1:03d}.json").read_text())
        assert saved == record["scribbles"]
    assert any((output / name).is_file() for name in ("overlay.mp4", "overlay.gif"))
    assert str(output) in browser.find_element(By.ID, "export-result").text

    draw(browser, [(20, 20), (30, 25)])  # drawn, not sent: the reload keeps it too
    browser.refresh()
    open_page(browser, server)
    wait_for(browser, 'document.body.dataset.round === "2"')
    committed = browser.execute_script("return window.stmAnnotate.committed")
    assert [len(committed[t]) for t in (0, 3)] == [2, 2]
    assert [len(frame) for frame in pending(browser)] == [0, 0, 0, 1, 0, 0]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history li")) == 2
    np.testing.assert_array_equal(page_masks(browser, *SIZE), expected)

    server.stop()  # a new server on the same output folder replays the rounds and goes on
    again = AnnotationServer(folder, output, model)
    again.start()
    try:
        open_page(browser, again)
        wait_for(browser, 'document.body.dataset.round === "2" && '
                          'document.body.dataset.busy === "0"')
        assert "continuing the session" in browser.find_element(By.ID, "message").text
        np.testing.assert_array_equal(page_masks(browser, *SIZE), expected)
    finally:
        again.stop()


def test_cancel_and_the_errors_the_page_shows(browser, serve):
    """Segment without a stroke, a cancelled round (its strokes kept, unsent), removing an
    object after a round: each a message on the page, from the page or the server."""
    server, _, labels = serve(frames=8, size=(64, 96), objects=2)
    open_page(browser, server)
    browser.find_element(By.ID, "segment").click()
    message = browser.find_element(By.ID, "message")
    wait_for(browser, "!document.getElementById('message').hidden")
    assert "draw a scribble" in message.text

    progress = server._progress

    def slowly(done, total):  # a round slow enough to be cancelled from the page
        time.sleep(0.5)
        progress(done, total)
    server._progress = slowly
    draw(browser, through(labels[0], 1))
    browser.find_element(By.ID, "segment").click()
    wait_for(browser, "document.getElementById('progress').textContent.includes('segmenting')")
    assert browser.find_element(By.ID, "segment").get_attribute("disabled")
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, 'document.body.dataset.busy === "0"')
    assert "cancelled" in message.text and server.rounds == []
    strokes = pending(browser)[0]
    assert len(strokes) == 1 and "sent" not in strokes[0]

    server._progress = progress
    run_round(browser, 1)
    browser.find_element(By.ID, "remove-object").click()
    wait_for(browser, "document.getElementById('message').textContent.includes('removed')")
    assert "only before the first round" in message.text and server.num_objects == 2
    assert not severe_browser_errors(browser)


def test_frames_are_stepped_from_the_keyboard_and_slider_without_loading(browser, serve):
    """←/→, the slider and play change the frame shown from frames loaded once: no request
    after the first load, and each switch's time is recorded for the benchmark."""
    server, _, _ = serve(frames=12, size=(64, 96))
    open_page(browser, server)
    requests = browser.execute_script("return performance.getEntriesByType('resource').length")
    for _ in range(4):
        press(browser, Keys.ARROW_RIGHT)
    press(browser, Keys.ARROW_LEFT)
    assert body(browser, "frame") == "3"
    browser.execute_script("const s = document.getElementById('slider'); s.value = 9;"
                           "s.dispatchEvent(new Event('input'));")
    assert body(browser, "frame") == "9"
    assert browser.find_element(By.ID, "frame-label").text == "frame 9 / 11"
    press(browser, " ")  # play: the frames advance (and wrap) by themselves
    wait_for(browser, 'document.body.dataset.frame === "2"', timeout=10)
    press(browser, " ")
    stopped = body(browser, "frame")
    time.sleep(0.3)
    assert body(browser, "frame") == stopped
    assert browser.execute_script(
        "return performance.getEntriesByType('resource').length") == requests
    times = browser.execute_script("return window.stmAnnotate.switchTimes")
    assert len(times) >= 7 and all(0 <= t < 10_000 for t in times)


ATTACKER_PAGE = """<!doctype html><html><body><form id="form" method="POST"
action="{target}/api/export" target="sink"><input name="x" value="1"></form>
<iframe name="sink"></iframe><script>
window.results = {{}};
async function attempt(name, make) {{
  try {{ const response = await make(); window.results[name] = "status " + response.status +
         " " + (await response.text()); }}
  catch (error) {{ window.results[name] = "blocked"; }}
}}
(async () => {{
  // a text/plain POST needs no preflight: it is sent, with the cookie (same site)
  await attempt("text", () => fetch("{target}/api/objects", {{method: "POST", mode: "no-cors",
      credentials: "include", body: JSON.stringify({{num_objects: 7}}),
      headers: {{"Content-Type": "text/plain"}}}}));
  // a JSON POST needs a preflight, which no CORS header answers
  await attempt("json", () => fetch("{target}/api/objects", {{method: "POST",
      credentials: "include", body: JSON.stringify({{num_objects: 7}}),
      headers: {{"Content-Type": "application/json"}}}}));
  // reading the session or a frame from another origin
  await attempt("read", () => fetch("{target}/api/session", {{credentials: "include"}}));
  document.getElementById("form").submit();
  setTimeout(() => {{ window.done = true; }}, 500);
}})();
</script></body></html>"""


def test_a_page_of_another_origin_cannot_drive_or_read_the_server(browser, serve, tmp_path):
    """The user has the page open (the cookie is set); a page on another port of the same
    machine (same site, another origin) tries a no-preflight text/plain POST, a JSON POST, a
    read of the session and a form POST: nothing changes, nothing is read, nothing is
    exported; the user's own page still works."""
    import http.server
    import threading
    server, _, _ = serve(objects=2)
    open_page(browser, server)
    page = ATTACKER_PAGE.format(target=server.address).encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{attacker.server_address[1]}/")
        wait_for(browser, "window.done === true")
        results = browser.execute_script("return window.results")
    finally:
        attacker.shutdown()
        attacker.server_close()
    assert server.num_objects == 2, results
    assert not (server.output / "masks").exists() and not list(server.output.glob("overlay*"))
    assert results["json"] == "blocked" and results["read"] == "blocked", results
    browser.get(server.address + "/")  # the cookie, not the token, opens the page now
    wait_for(browser, 'document.body.dataset.ready === "1"')
    assert browser.execute_script("return window.stmAnnotate.session.num_objects") == 2
    assert "token" not in browser.current_url
