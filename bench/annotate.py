"""The browser annotation page (`stm annotate`) in headless Chromium: first load, frame switches
before and after a round, and the round itself, on a synthetic 480p video of 100 frames.

Frame switch: an ArrowRight key press until the new frame is drawn, measured two ways: in the
page (the key event's time stamp to the next animation frame after drawing: what a user waits)
and from the test driver (the key sent until the page reports the new frame: WebDriver's own
round trips included, an upper bound). A round: one stroke on frame 0, every frame segmented by
the server (the small interactive model on this machine) and the masks loaded by the page.
"""
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

from bench import common

DEFAULTS = dict(frames=100, size=(480, 854), switches=99)


def synthetic_frames(folder, frames, size):
    """A held-out synthetic video as JPEG frames (as a camera's); returns its (T, H, W) labels."""
    from PIL import Image
    from stm_model.training.datasets import HELD_OUT_SEEDS
    from stm_model.training.synthetic import SyntheticVideo
    folder.mkdir(parents=True)
    video = SyntheticVideo(HELD_OUT_SEEDS + 4, *size, num_objects=2)
    labels = []
    for t, (image, label) in enumerate(video.frames(frames)):
        Image.fromarray((np.asarray(image) * 255).round().astype(np.uint8)).save(
            folder / f"{t:05d}.jpg", quality=90)
        labels.append(label)
    return np.stack(labels)


def switch_times(driver, count):
    """Press ArrowRight `count` times: (in-page ms, driver-side ms) per switch."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from tools.headless_chromium import wait_for
    driver.execute_script("window.stmAnnotate.switchTimes.length = 0")
    start_frame = int(driver.execute_script("return document.body.dataset.frame"))
    total = int(driver.execute_script("return window.stmAnnotate.session.num_frames"))
    outside = []
    for step in range(1, count + 1):
        expected = min(start_frame + step, total - 1)
        tick = time.perf_counter()
        ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
        wait_for(driver, f'document.body.dataset.frame === "{expected}"', timeout=30)
        outside.append((time.perf_counter() - tick) * 1e3)
    wait_for(driver, f"window.stmAnnotate.switchTimes.length >= {count}", timeout=30)
    inside = driver.execute_script("return window.stmAnnotate.switchTimes")
    return [float(value) for value in inside[:count]], outside


def spread(values):
    """Median, 95th percentile and maximum of a list of milliseconds."""
    ordered = sorted(values)
    return dict(median_ms=statistics.median(ordered),
                p95_ms=ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
                max_ms=ordered[-1], count=len(ordered))


def measure(spec):
    """One run of the page (see the module docstring); returns the record."""
    from stm_model.annotate.server import AnnotationServer
    from stm_model.demo import SMALL_INTERACTIVE_WEIGHTS, load_small_model
    from tools import headless_chromium
    from tools.headless_chromium import wait_for
    work = pathlib.Path(tempfile.mkdtemp(prefix="stm_bench_annotate_"))
    labels = synthetic_frames(work / "frames", spec["frames"], spec["size"])
    server = AnnotationServer(work / "frames", work / "out",
                              load_small_model(SMALL_INTERACTIVE_WEIGHTS),
                              max_internal_size=spec["max_internal_size"])
    server.start()
    driver = headless_chromium.headless_chromium(work / "chromium", window=(1400, 900))
    try:
        tick = time.perf_counter()
        driver.get(server.url)
        wait_for(driver, 'document.body.dataset.ready === "1"', timeout=600)
        load_s = time.perf_counter() - tick
        before = switch_times(driver, spec["switches"])
        record = dict(load_s=load_s, before_round=dict(page=spread(before[0]),
                                                      driver=spread(before[1]),
                                                      page_ms=before[0]))
        if spec["round"]:
            driver.execute_script("document.getElementById('slider').value = 0;"
                                  "document.getElementById('slider')"
                                  ".dispatchEvent(new Event('input'));")
            rows, columns = np.nonzero(labels[0] == 1)
            row = int(np.median(rows))
            inside = np.sort(columns[rows == row])
            headless_chromium.draw(driver, "frame-canvas", [
                (float(x), float(row)) for x in np.linspace(inside[0], inside[-1], 6)[1:-1]])
            tick = time.perf_counter()
            driver.find_element("id", "segment").click()
            wait_for(driver, 'document.body.dataset.round === "1" && '
                             'document.body.dataset.busy === "0"', timeout=3600)
            record["round_s"] = time.perf_counter() - tick
            record["round_server_s"] = server.rounds[0]["seconds"]
            after = switch_times(driver, spec["switches"])
            record["after_round"] = dict(page=spread(after[0]), driver=spread(after[1]),
                                         page_ms=after[0])
        return record
    finally:
        driver.quit()
        server.stop()


def summary(payload):
    """Markdown table: load, round and switch times."""
    record = payload["records"][0]
    height, width = payload["size"]
    rows = [f"{payload['frames']} frames of {width}x{height} (sent at display size, shorter side "
            f"at most 480), headless Chromium on {payload['device']}. Switch: ArrowRight to "
            "the next animation frame after drawing (in the page) and to the page reporting "
            "the new frame (from the driver, its round trips included).", "",
            "| stage | median ms | p95 ms | max ms |", "|---|---:|---:|---:|"]
    for stage in ("before_round", "after_round"):
        if stage not in record:
            continue
        for side in ("page", "driver"):
            values = record[stage][side]
            rows.append(f"| switch {stage.replace('_', ' ')}, {side} | "
                        f"{values['median_ms']:.1f} | {values['p95_ms']:.1f} | "
                        f"{values['max_ms']:.1f} |")
    rows += ["", f"First load (every frame fetched and decoded): {record['load_s']:.2f} s."]
    if "round_s" in record:
        rows.append(f"A round from one stroke: {record['round_s']:.1f} s on the page "
                    f"({record['round_server_s']:.1f} s segmenting on the server, "
                    f"max internal size {payload['max_internal_size'] or 'the frames'}).")
    return "\n".join(rows)


def plot(payload, path):
    """The distribution of in-page frame-switch times before and after a round; returns
    [path]."""
    figure, axis = common.subplots(figsize=(6, 3.6))
    record = payload["records"][0]
    for stage, label in (("before_round", "frames only"), ("after_round", "frames + masks")):
        if stage in record:
            values = np.sort(record[stage]["page_ms"])
            axis.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                      label=label)
    axis.axvline(100, color="grey", linestyle=":", label="100 ms")
    axis.set(xlabel="frame switch, ms (key event to the next animation frame)",
             ylabel="fraction of switches", title=f"stm annotate, {payload['frames']} frames "
             f"{payload['size'][1]}x{payload['size'][0]}")
    axis.set_xlim(left=0)
    axis.legend()
    return common.save_figure(figure, path)


def main(argv=None):
    """`python -m bench annotate`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, "python -m bench annotate", device_choices=("cpu",))
    parser.add_argument("--frames", type=int, default=DEFAULTS["frames"])
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        default=DEFAULTS["size"])
    parser.add_argument("--switches", type=int, default=DEFAULTS["switches"],
                        help="ArrowRight presses timed before and after the round")
    parser.add_argument("--max-internal-size", type=int, metavar="PIXELS",
                        help="the session's internal size (default: the frames' own)")
    parser.add_argument("--no-round", dest="round", action="store_false",
                        help="time the frame switches only")
    args = parser.parse_args(argv)
    from tools import headless_chromium
    why = headless_chromium.missing()
    if why is not None:
        raise SystemExit(f"python -m bench annotate needs a headless Chromium: {why}")
    if args.switches >= args.frames:
        raise SystemExit(f"--switches {args.switches}: at most --frames - 1 = "
                         f"{args.frames - 1} (each press steps one frame forward)")
    device = common.pick_device(args.device)
    spec = dict(frames=args.frames, size=list(args.size), switches=args.switches,
                max_internal_size=args.max_internal_size, round=args.round)
    payload = common.environment(device)
    payload.update(benchmark="annotate", **spec, records=[measure(spec)])
    common.finish_run("annotate", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
