"""The system's Chromium, headless, driven by Selenium: for the browser tests of `stm annotate`
and its benchmark.

    driver = headless_chromium(profile_dir)     # None without Chromium, chromedriver or selenium
    driver.get(url)
    ...
    driver.quit()

The system's chromedriver is passed explicitly, so Selenium Manager never downloads a driver
(no network at run time); the flags keep Chromium from reaching the network by itself.
"""
import shutil

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-sync",
         "--disable-component-update", "--disable-quic", "--force-device-scale-factor=1")


def find_chromium():
    """(browser, chromedriver) paths on PATH, or None when either is missing."""
    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def missing():
    """Why no headless Chromium can start here (a sentence), or None when it can."""
    try:
        import selenium  # noqa: F401  (the dev extra)
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if find_chromium() is None:
        return ("no Chromium and chromedriver on PATH (Debian: apt-get install chromium "
                "chromium-driver; .ci/run installs them)")
    return None


def headless_chromium(profile_dir, window=(1100, 760)):
    """A Selenium WebDriver of a new headless Chromium with its profile in `profile_dir`, its
    browser log kept (driver.get_log("browser")); None when `missing()` says why not."""
    if missing() is not None:
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS + (f"--window-size={window[0]},{window[1]}",
                         f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chromium = webdriver.Chrome(service=Service(driver), options=options)
    chromium.set_script_timeout(60)
    return chromium


def wait_for(driver, script, timeout=120):
    """Poll a JavaScript expression in the page until it is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(
        lambda d: d.execute_script(f"return {script}"))


def draw(driver, element_id, points):
    """A stroke of mouse events (pointer down, moves, up) through `points`, given in pixels of
    the canvas `element_id` (its width and height attributes, whatever its shown size); returns
    the viewport positions used and the canvas's box [left, top, width, height] so callers can
    work out where the page must have put them."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    driver.execute_script("window.scrollTo(0, 0)")
    left, top, width, height, columns, rows = driver.execute_script(
        f"const c = document.getElementById('{element_id}'); const b = c.getBoundingClientRect();"
        "return [b.left, b.top, b.width, b.height, c.width, c.height];")
    at = [(round(left + x * width / columns), round(top + y * height / rows)) for x, y in points]
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(*at[0])
    actions.pointer_action.pointer_down()
    for x, y in at[1:]:
        actions.pointer_action.move_to_location(x, y)
    actions.pointer_action.pointer_up()
    actions.perform()
    return at, (left, top, width, height, columns, rows)
