"""The page for people at ``/``: its files and routes, and the page itself in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from bench.server import Server
from sota_serve.http import page
from sota_serve.http.docs import ASSET_PREFIX
from sota_serve.http.docs import ASSETS as DOCS_ASSETS
from sota_serve.http.page import ASSETS, PAGE_DIR
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import ModelCard
from sota_serve.tta import POLICIES
from tests.helpers import PHOTOS, card_dict
from tests.test_server import post

ARTIFACTS = Path(os.environ.get("SOTA_SERVE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "build" / "test-artifacts"))
BROWSER_HELP = ("no headless Chromium: install Debian's `chromium` and `chromium-driver`"
                " (`apt-get install chromium chromium-driver`, as .ci/run does) to run the page in a browser")


def test_the_page_works_offline():
    """Everything it loads comes from this server: no CDN, no absolute URLs."""
    for name in ASSETS.values():
        text = (PAGE_DIR / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{name} loads from elsewhere"
    html = (PAGE_DIR / "index.html").read_text()
    assert 'name="viewport"' in html and "__CONFIG__" in html
    docs = (PAGE_DIR / "docs.html").read_text()  # the OpenAPI UI's page; its assets are relative
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", docs, re.I) and 'src="docs/swagger-ui-' in docs


@pytest.mark.slow
def test_page_routes(server, tiny_package):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    config = json.loads(re.search(r'<script id="config" type="application/json">(.*?)</script>', page.text).group(1))
    card = ModelCard.load(tiny_package / "card.json")
    assert config["model"] == card.tag and config["default"] == card.tta.default
    assert [p["name"] for p in config["policies"]] == list(POLICIES)  # the tiny card has them all
    assert [p["crops"] for p in config["policies"]] == [1, 2, 5, 10]
    for path, name in ASSETS.items():
        if path != "/":
            response = httpx.get(f"{server.url}{path}")
            assert response.status_code == 200 and response.content == (PAGE_DIR / name).read_bytes()
    assert httpx.get(f"{server.url}/page/page.js").headers["content-type"].startswith("text/javascript")
    head = httpx.head(f"{server.url}/")
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html") and not head.content
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "googletagmanager" not in docs.text
    for name in DOCS_ASSETS:  # the pinned copy the package ships, not BentoML's
        asset = httpx.get(f"{server.url}{ASSET_PREFIX}{name}")
        assert asset.status_code == 200 and asset.content == (PAGE_DIR / name).read_bytes()
        assert f"{ASSET_PREFIX.removeprefix('/')}{name}" in docs.text


@pytest.mark.slow
def test_crops_are_the_preprocessors_windows_on_the_original(server, tiny_package):
    pre = Preprocessor.from_card(ModelCard.load(tiny_package / "card.json"))
    for tta in POLICIES:
        answer = httpx.get(f"{server.url}/crops", params={"width": 640, "height": 427, "tta": tta}).json()
        assert answer["resize_shortest_edge"] == pre.edge(tta)
        boxes = [(w["left"], w["top"], w["width"], w["height"], w["mirrored"]) for w in answer["windows"]]
        want = pre.source_windows(640, 427, tta)
        assert len(boxes) == len(want) == {"none": 1, "flip": 2, "five_crop": 5, "ten_crop": 10}[tta]
        for got, exp in zip(boxes, want, strict=True):
            assert got[4] == exp[4] and all(abs(a - b) < 0.01 for a, b in zip(got[:4], exp[:4], strict=True))
    # five-crop corners sit on the image's corners; each crop is crop/resize of the short side
    five = pre.source_windows(640, 427, "five_crop")
    assert five[0][:2] == (0, 0) and abs(five[3][0] + five[3][2] - 640) < 1e-6 and abs(five[3][1] + five[3][3] - 427) < 1e-6
    assert abs(five[0][3] - 427 * 32 / 40) < 1e-6
    for query, message in [({"width": 0, "height": 5}, "width"), ({"width": 5}, "height"),
                           ({"width": 5, "height": 5, "tta": "twenty_crop"}, "unknown tta")]:
        response = httpx.get(f"{server.url}/crops", params=query)
        assert response.status_code in (400, 422) and message in response.json()["error"]


def _browser(width: int = 390, height: int = 844):
    """Headless Chromium whose page is exactly width x height CSS pixels (a window's size would
    include the browser's own bars); below 600 px wide, a phone's (its viewport meta honoured)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [test] extra")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip(BROWSER_HELP)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height + 200}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    return browser


@pytest.mark.slow
def test_page_in_a_real_browser_classifies_an_uploaded_digit(server, digit_files):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = digit_files[3]
    want = post(server, "/classify", {"image": (image.name, image.read_bytes())}, {"top_k": 3}).json()
    browser = _browser()
    try:
        browser.get(f"{server.url}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#card-summary dd"))
        assert "tiny-cnn" in browser.find_element(By.ID, "card-summary").text
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results li"))
        shown = [li.get_attribute("data-label") for li in browser.find_elements(By.CSS_SELECTOR, "#results li")]
        assert shown[:3] == [p["label"] for p in want["predictions"]]
        # a plain answer: its one crop outlined, with no number on it
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#boxes .box")) == 1)
        assert not browser.find_elements(By.CSS_SELECTOR, "#boxes b")
        # five-crop on: the page asks again and draws the five crops on the image, numbered
        browser.find_element(By.CSS_SELECTOR, 'label[for="tta-five_crop"]').click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#boxes .box")) == 5)
        wait.until(lambda b: "five_crop" in b.find_element(By.ID, "status").text)
        assert [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#boxes b")] == ["1", "2", "3", "4", "5"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "page.png"))
        # an API error: in words for a person, with the API's message and status below them, and
        # nothing of the earlier answer left under it
        bad = ARTIFACTS / "not-an-image.png"
        bad.write_bytes(b"plain text, not a PNG")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda b: b.find_element(By.ID, "error").is_displayed())
        error = browser.find_element(By.ID, "error")
        assert error.text.splitlines()[0] == "This file is not an image. Try a JPEG or PNG."
        detail = error.find_element(By.CLASS_NAME, "detail").text
        assert "not a recognised image" in detail and "HTTP 400" in detail
        assert not browser.find_elements(By.CSS_SELECTOR, "#results li, #boxes .box")
        assert not browser.find_element(By.ID, "served").is_displayed()
    finally:
        browser.quit()


#: Visible <img> elements with no picture: no src yet, or one the browser could not draw.
BROKEN_IMAGES = """return [...document.images].filter((i) => i.getClientRects().length
    && getComputedStyle(i).visibility !== "hidden" && (!i.getAttribute("src") || !i.naturalWidth)).length"""
#: Whether an element is on screen from its top down to another's bottom.
IN_VIEW = """const top = arguments[0].getBoundingClientRect().top, bottom = arguments[1].getBoundingClientRect().bottom;
    return top >= 0 && bottom <= window.innerHeight;"""
#: The page-relative boxes of the crop badges.
BADGES = """return [...document.querySelectorAll("#boxes b")].map((b) => {
    const r = b.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom, b.textContent]; })"""


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.slow
@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 900)])
def test_page_at_phone_and_desktop_size(server, photos, tmp_path, width, height):
    """What a person sees first: no broken-image icon before an upload or under an error, the
    out-of-distribution warning above the labels and both in view when the answer arrives, the
    API's TTA names, one column and a full-width picture on a phone, ten crops' badges apart."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser(width, height)
    try:
        browser.get(f"{server.url}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#card-summary dd"))
        assert browser.execute_script(BROKEN_IMAGES) == 0
        # the tag stays on one line (it breaks as a whole or not at all)
        tag = browser.find_element(By.ID, "model-tag")
        line = float(browser.execute_script("return parseFloat(getComputedStyle(arguments[0]).lineHeight)", tag))
        assert tag.text and tag.size["height"] < 1.5 * line
        # the TTA choices are the API's names, as values and as text
        radios = browser.find_elements(By.CSS_SELECTOR, 'input[name="tta"]')
        assert [r.get_attribute("value") for r in radios] == list(POLICIES)
        assert [el.text for el in browser.find_elements(By.CSS_SELECTOR, "#tta-options span")] == list(POLICIES)

        # the fallback choice promises no more than the ladder does
        assert "at once" not in browser.find_element(By.ID, "fallback-choice").text
        assert "can still come later than the budget" in browser.find_element(By.ID, "fallback-help").text

        browser.find_element(By.ID, "file").send_keys(str(photos[0]))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results li"))
        wait.until(lambda b: b.find_element(By.ID, "preview").is_displayed())
        ood, first = browser.find_element(By.ID, "ood"), browser.find_element(By.CSS_SELECTOR, "#results li")
        # a photo is unlike the digits the tiny model knows: the warning leads the answer
        assert ood.is_displayed() and ood.rect["y"] + ood.rect["height"] <= first.rect["y"]
        wait.until(lambda b: b.execute_script(IN_VIEW, ood, first))
        assert browser.execute_script("return window.innerHeight") == height
        if width >= 1000:  # beside the choices: in view as it is, nothing scrolls
            assert browser.execute_script("return window.scrollY") == 0
        assert browser.execute_script(BROKEN_IMAGES) == 0
        frame, answer = browser.find_element(By.ID, "frame").rect, browser.find_element(By.ID, "answer").rect
        view = browser.find_element(By.ID, "view").rect
        if width < 520:  # one column: the answer, then the picture as wide as the page's column
            assert frame["y"] >= answer["y"] + answer["height"] and frame["width"] >= view["width"] - 1
        else:  # two: the picture on the left
            assert frame["x"] + frame["width"] <= answer["x"] and frame["y"] == pytest.approx(answer["y"], abs=1)

        # an answer that arrives while the page is scrolled elsewhere is brought into view
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        browser.execute_script("document.getElementById('tta-ten_crop').click()")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#boxes .box")) == 10)
        wait.until(lambda b: b.execute_script(IN_VIEW, ood, b.find_element(By.CSS_SELECTOR, "#results li")))
        badges = browser.execute_script(BADGES)
        assert len(badges) == 10
        piled = [(a[4], b[4]) for i, a in enumerate(badges) for b in badges[i + 1:] if _overlap(a, b)]
        assert not piled, f"badges on top of each other: {piled}"
        frame = browser.find_element(By.ID, "frame").rect
        assert all(frame["x"] - 1 <= b[0] and b[2] <= frame["x"] + frame["width"] + 1 for b in badges)
        shots = os.environ.get("SOTA_SERVE_PAGE_SHOTS")
        if shots:  # for a person to look at
            browser.save_screenshot(str(Path(shots) / f"page-{width}x{height}.png"))

        # a file that is not an image: the error, and no broken-image icon under it
        bad = tmp_path / "not-an-image.png"
        bad.write_bytes(b"plain text, not a PNG")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda b: b.find_element(By.ID, "error").is_displayed())
        assert browser.execute_script(BROKEN_IMAGES) == 0
        error = browser.find_element(By.ID, "error")
        wait.until(lambda b: b.execute_script(IN_VIEW, error, error))
        assert not browser.find_element(By.ID, "ood").is_displayed()
        if shots:
            browser.save_screenshot(str(Path(shots) / f"page-{width}x{height}-error.png"))
    finally:
        browser.quit()


def test_the_page_offers_each_policys_recorded_accuracy():
    card = ModelCard.parse(card_dict(metrics={"accuracy": 0.9, "accuracy_five_crop": 0.95}))
    _, _, html = page.asset("/", Preprocessor.from_card(card), card)
    config = json.loads(re.search(rb'<script id="config" type="application/json">(.*?)</script>', html).group(1))
    assert {p["name"]: p["accuracy"] for p in config["policies"]} == {
        "none": 0.9, "flip": None, "five_crop": 0.95, "ten_crop": None}


@pytest.mark.slow
def test_a_degraded_answer_shows_what_it_was_asked_and_its_expected_accuracy(tiny_package, digit_files, photos,
                                                                              tmp_path):
    """A server whose latency budget nothing fits, so that a request with tta_fallback is always
    served plain (the page asks for a late answer rather than a strict budget's 503): the page
    says so, with the card's accuracy of both policies; for an image
    unlike the training images, with no accuracy at all; and none of it stays under an error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    package = tmp_path / "package"
    shutil.copytree(tiny_package, package)
    card = json.loads((package / "card.json").read_text())
    card["metrics"] = {"accuracy": 0.9, "accuracy_five_crop": 0.95}
    (package / "card.json").write_text(json.dumps(card))
    # budgets strict by default: the page's choice still gets a late answer, never a 503 for the budget
    env = {"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_TTA_BUDGET_S": "1e-6", "SOTA_SERVE_TTA_BUDGET_STRICT": "1"}
    with Server(package, home=tmp_path / "bentoml", env=env) as server:
        server.wait_ready()
        browser = _browser()
        try:
            browser.get(f"{server.url}/")
            wait = WebDriverWait(browser, 30)
            browser.find_element(By.CSS_SELECTOR, 'label[for="tta-five_crop"]').click()
            browser.find_element(By.ID, "file").send_keys(str(digit_files[0]))
            wait.until(lambda b: "five_crop" in b.find_element(By.ID, "served").text)
            assert browser.find_element(By.ID, "served").text == (
                "Expected accuracy with five_crop: 95.00 % (validation images).")  # not asked to fall back
            assert not browser.find_element(By.ID, "ood").is_displayed()
            # a photo: the warning, and no accuracy promised for it
            browser.find_element(By.ID, "file").send_keys(str(photos[0]))
            wait.until(lambda b: b.find_element(By.ID, "ood").is_displayed())
            assert not browser.find_element(By.ID, "served").is_displayed()
            assert "accuracy does not apply" in browser.find_element(By.ID, "ood").text
            browser.find_element(By.ID, "fallback").click()
            browser.find_element(By.ID, "file").send_keys(str(digit_files[1]))
            wait.until(lambda b: "busy" in b.find_element(By.ID, "served").text)
            assert browser.find_element(By.ID, "served").text == (
                "The server was busy: answered with none instead of five_crop."
                " Expected accuracy 90.00 % instead of 95.00 %.")
            assert "tta none" in browser.find_element(By.ID, "status").text
            assert not browser.find_element(By.ID, "ood").is_displayed()
            browser.find_element(By.ID, "file").send_keys(str(photos[1]))
            wait.until(lambda b: b.find_element(By.ID, "ood").is_displayed())
            served = browser.find_element(By.ID, "served")
            assert served.text == "The server was busy: answered with none instead of five_crop."
            assert browser.find_element(By.ID, "ood").rect["y"] < served.rect["y"]
            # an error: the last answer's accuracy line goes with its scores
            bad = tmp_path / "not-an-image.png"
            bad.write_bytes(b"plain text, not a PNG")
            browser.find_element(By.ID, "file").send_keys(str(bad))
            wait.until(lambda b: b.find_element(By.ID, "error").is_displayed())
            assert not browser.find_element(By.ID, "served").is_displayed()
            assert not browser.find_element(By.ID, "ood").is_displayed()
        finally:
            browser.quit()


#: The occlusion canvas's pixels, one per cell, as [[r, g, b], ...] row by row.
HEAT_PIXELS = """const c = document.getElementById("heat");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    return [...Array(c.width * c.height).keys()].map((i) => [d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]]);"""


@pytest.mark.slow
def test_page_shows_what_the_model_looked_at(server, digit_files):
    """The toggle asks /explain and draws its map over the crop window, on the server's scale."""
    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from sota_serve.explain.heatmap import ALPHA, colours, scaled

    image = digit_files[5]
    want = post(server, "/explain", {"image": (image.name, image.read_bytes())}).json()
    browser = _browser(1000, 900)
    try:
        browser.get(f"{server.url}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#card-summary dd"))
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results li"))
        assert not browser.find_element(By.ID, "heat").is_displayed()  # off until asked for
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#boxes .box").is_displayed())
        browser.find_element(By.ID, "explain-toggle").click()
        wait.until(lambda b: b.find_element(By.ID, "heat").is_displayed())
        # the map alone over the picture: the crop's outline is hidden under it, and the legend says so
        assert not browser.find_element(By.CSS_SELECTOR, "#boxes .box").is_displayed()
        assert "outlines are hidden" in browser.find_element(By.ID, "heat-note").text
        heat = browser.find_element(By.ID, "heat")
        assert heat.get_attribute("data-label") == want["label"]
        assert int(heat.get_attribute("width")) == int(heat.get_attribute("height")) == len(want["grid"]) == 8
        drawn = np.array(browser.execute_script(HEAT_PIXELS)).reshape(8, 8, 4)
        t = scaled(np.asarray(want["grid"]))[0]
        # the API's map on the API's colour scale, more opaque the larger the drop (a canvas
        # keeps colours premultiplied: compare them where they are opaque enough to keep)
        assert np.abs(drawn[..., 3] - 255 * ALPHA * t).max() <= 1
        strong = t >= 0.5
        assert strong.any() and np.abs(drawn[strong][:, :3] - colours(t)[strong]).max() <= 3
        # over the crop window: inside the picture, as large as the window is on it
        frame, box = browser.find_element(By.ID, "frame").rect, heat.rect
        assert frame["x"] - 1 <= box["x"] and box["x"] + box["width"] <= frame["x"] + frame["width"] + 1
        assert box["width"] == pytest.approx(frame["width"] * want["window"]["width"] / 64, abs=1.5)
        legend = browser.find_element(By.ID, "heat-legend")
        assert legend.is_displayed() and f"Lower score of {want['label']} when" in legend.text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "explain.png"))
        # another image gets its own map; the toggle off hides it
        other = digit_files[6]
        alpha = 255 * ALPHA * scaled(np.asarray(post(server, "/explain", {"image": (other.name, other.read_bytes())})
                                                .json()["grid"]))[0]
        assert np.abs(drawn[..., 3] - alpha).max() > 1  # the two maps differ
        browser.find_element(By.ID, "file").send_keys(str(other))
        wait.until(lambda b: b.find_element(By.ID, "heat").is_displayed() and np.abs(
            np.array(b.execute_script(HEAT_PIXELS)).reshape(8, 8, 4)[..., 3] - alpha).max() <= 1)
        assert not browser.find_element(By.CSS_SELECTOR, "#boxes .box").is_displayed()
        browser.find_element(By.ID, "explain-toggle").click()
        assert not browser.find_element(By.ID, "heat").is_displayed()
        assert not browser.find_element(By.ID, "heat-legend").is_displayed()
        assert browser.find_element(By.CSS_SELECTOR, "#boxes .box").is_displayed()
    finally:
        browser.quit()


def shoot_docs(model: str, out: Path) -> None:
    """The documents' screenshots, from a real ``bentoml serve`` of ``model`` (the demo:
    packages/sota-demo or sota-demo:latest): page.png (1280x900) and page-phone.png (390x844),
    Grace Hopper's photo with five-crop; explain.png (1280x980, down to the map's legend),
    examples/three.png's map."""
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    three = Path(__file__).resolve().parents[1] / "examples" / "three.png"

    def settled(browser) -> bool:  # the smooth scroll to the answer has ended
        first = browser.execute_script("return window.scrollY")
        time.sleep(0.3)
        return browser.execute_script("return window.scrollY") == first

    with Server(model) as server:
        server.wait_ready()
        for name, (width, height) in {"page.png": (1280, 900), "page-phone.png": (390, 844)}.items():
            browser = _browser(width, height)
            try:
                browser.get(f"{server.url}/")
                wait = WebDriverWait(browser, 60)
                wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#card-summary dd"))
                browser.execute_script("document.getElementById('tta-five_crop').click()")
                browser.find_element(By.ID, "file").send_keys(str(PHOTOS[0]))
                wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#boxes .box")) == 5
                           and b.find_element(By.ID, "preview").is_displayed())
                wait.until(settled)
                browser.save_screenshot(str(out / name))
            finally:
                browser.quit()
        browser = _browser(1280, 980)
        try:
            browser.get(f"{server.url}/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#card-summary dd"))
            browser.find_element(By.ID, "explain-toggle").click()
            browser.find_element(By.ID, "file").send_keys(str(three))
            wait.until(lambda b: b.find_element(By.ID, "heat").is_displayed()
                       and b.find_element(By.ID, "preview").is_displayed())
            wait.until(settled)
            browser.save_screenshot(str(out / "explain.png"))
        finally:
            browser.quit()


if __name__ == "__main__":  # python -m tests.test_page packages/sota-demo docs
    import sys

    shoot_docs(sys.argv[1], Path(sys.argv[2]))


@pytest.mark.slow
def test_the_openapi_ui_renders_the_document_in_a_real_browser(server, photos):
    """/docs runs the pinned Swagger UI: its assets load from this server, it renders every
    route of /docs.json, and its form for /classify sends a request the server answers."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    paths = httpx.get(f"{server.url}/docs.json").json()["paths"]
    browser = _browser(1280, 900)
    try:
        browser.get(f"{server.url}/docs")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")) == sum(map(len, paths.values())))
        assert {e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")} == set(paths)
        assert "sota-serve: tiny-cnn:1" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
        operation = browser.find_element(By.ID, "operations-default-post_classify")
        operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(lambda b: operation.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
        assert all(name in operation.text for name in ("tta_fallback", "tta_budget_s", "top_k"))
        operation.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
        wait.until(lambda b: operation.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        operation.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(photos[0]))
        operation.find_element(By.CSS_SELECTOR, ".execute").click()
        wait.until(lambda b: operation.find_elements(By.CSS_SELECTOR, ".live-responses-table .response-col_status"))
        answer = operation.find_element(By.CSS_SELECTOR, ".live-responses-table").text
        assert "200" in answer and '"model": "tiny-cnn:1"' in answer, answer[:500]
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()
