"""The steering studio (``GET /``, serve/studio.py) in a real headless Chromium -- Debian's ``chromium`` and
``chromium-driver``, driven by selenium -- against a real server (uvicorn on a port, the engine loop) on a tiny
random llama: the page loads without console errors and lists the server's vectors, a prompt streams into the
columns, moving the strength slider re-runs the steered column and not the plain one, an unknown vector shows the
server's own error text, and a server with an API key asks for it. Skipped, with the reason, where no browser is
installed (``.ci/run`` installs one)."""

import json
import shutil
import time
import urllib.error
import urllib.request

import pytest
import torch

from steerscale import Site, SiteKind
from steerscale.serve import App, start_server
from steerscale.steer.vector import SteeringVector
from tiny import ChatCharTokenizer, tiny_model

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None
needs_browser = pytest.mark.skipif(
    webdriver is None or not (CHROMIUM and DRIVER),
    reason="no headless browser: install Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver; .ci/run does) and selenium (pip install -e .[dev])")

KEY = "studio-test-key"


@pytest.fixture(scope="module")
def parts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, layout = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    vecs = {name: SteeringVector({Site(layer, SiteKind.RESID_POST): torch.randn(
        layout.site_dim(Site(layer, SiteKind.RESID_POST)), generator=g) * 3}) for name, layer in (("a", 0), ("b", 1))}
    # 5 ms a forward pass: the tiny model would otherwise finish before the page sees a second chunk
    slow = model.register_forward_pre_hook(lambda *_: time.sleep(0.005))
    yield model, layout, vecs
    slow.remove()
    torch.set_num_threads(threads)


def serve(parts, **kw):
    model, layout, vecs = parts
    return start_server(App(model, ChatCharTokenizer(), layout, model_id="tiny", vectors=dict(vecs), **kw))


@pytest.fixture(scope="module")
def server(parts):
    srv = serve(parts)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def root(srv) -> str:
    return srv.url.rsplit("/v1", 1)[0] + "/"


def until(driver, cond, timeout=30):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: cond())


def col(driver, name):
    el = driver.find_element(By.ID, f"col-{name}")
    return {"state": el.get_attribute("data-state"), "run": int(el.get_attribute("data-run")),
            "chunks": int(el.get_attribute("data-chunks") or 0),
            "text": el.find_element(By.CLASS_NAME, "output").get_attribute("textContent"),
            "error": el.find_element(By.CLASS_NAME, "error").get_attribute("textContent"),
            "meta": el.find_element(By.CLASS_NAME, "meta").get_attribute("textContent")}


def severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def set_value(driver, element_id, value):
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def open_page(driver, srv):
    driver.get(root(srv))
    until(driver, lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true"
          or driver.find_element(By.ID, "key-panel").is_displayed())


@needs_browser
def test_the_page_streams_columns_and_the_slider_moves_only_the_steered_one(browser, server):
    open_page(browser, server)
    assert browser.find_element(By.ID, "model").text == "tiny"
    options = browser.find_elements(By.CSS_SELECTOR, "#vector-list option")
    assert [o.get_attribute("value") for o in options] == ["a", "b"]  # GET /v1/steering/vectors
    assert severe(browser) == []

    set_value(browser, "prompt", "Hello there")
    set_value(browser, "max-tokens", "24")
    set_value(browser, "vector", "a")
    assert browser.find_element(By.ID, "vector-info").text.startswith("a: custom at resid_post.0, norm ")
    slider = browser.find_element(By.ID, "scale")
    slider.send_keys(Keys.HOME)  # -10: far from what the slider moves to below
    browser.find_element(By.ID, "send").click()
    until(browser, lambda: all(col(browser, c)["state"] == "done" for c in ("plain", "steered", "prompt")))
    plain, first = col(browser, "plain"), col(browser, "steered")
    assert plain["text"] and first["text"] and plain["text"] != first["text"]
    assert plain["chunks"] >= 2 and first["chunks"] >= 2, "the replies arrived in one piece, not streamed"
    assert "24 tokens" in plain["meta"]  # the usage chunk (stream_options.include_usage)

    slider.send_keys(Keys.END)  # +10; one debounced request
    until(browser, lambda: col(browser, "steered")["run"] > first["run"] and col(browser, "steered")["state"] == "done")
    moved = col(browser, "steered")
    assert moved["text"] != first["text"]
    assert col(browser, "plain") == plain  # not re-run, not changed
    assert browser.find_element(By.CSS_SELECTOR, "#col-steered h2").text == "steered: a x10"

    # what the page showed is what the API answers for the same request
    api = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 24,
                        "temperature": 0, "steer": [{"vector": "a", "scale": 10}]})
    assert api["choices"][0]["message"]["content"] == moved["text"]
    assert severe(browser) == []


@needs_browser
def test_an_unknown_vector_shows_the_servers_error_text(browser, server):
    open_page(browser, server)
    set_value(browser, "prompt", "Hi")
    set_value(browser, "max-tokens", "4")
    set_value(browser, "vector", "nope")
    browser.find_element(By.ID, "send").click()
    until(browser, lambda: col(browser, "steered")["state"] == "error" and col(browser, "plain")["state"] == "done")
    status, body = post(server, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                 "steer": [{"vector": "nope", "scale": 4}]}, expect_error=True)
    assert status == 400 and "nope" in body["error"]["message"]
    assert col(browser, "steered")["error"] == body["error"]["message"]
    logged = severe(browser)  # the browser logs the refused request itself, and nothing else
    assert len(logged) == 1 and "chat/completions" in logged[0] and "400" in logged[0]


@needs_browser
def test_a_server_with_an_api_key_asks_for_it(browser, parts):
    srv = serve(parts, api_key=KEY)
    try:
        open_page(browser, srv)
        panel = browser.find_element(By.ID, "key-panel")
        assert panel.is_displayed() and "API key" in browser.find_element(By.ID, "status").text
        assert browser.find_elements(By.CSS_SELECTOR, "#vector-list option") == []  # nothing without the key
        logged = severe(browser)
        assert logged and all("401" in m for m in logged)  # only the refused /v1 calls
        set_value(browser, "api-key", KEY)
        browser.find_element(By.ID, "save-key").click()
        until(browser, lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        assert not panel.is_displayed()
        set_value(browser, "max-tokens", "4")
        browser.find_element(By.ID, "send").click()
        until(browser, lambda: col(browser, "plain")["state"] == "done")
        assert severe(browser) == []
    finally:
        browser.execute_script("sessionStorage.clear()")
        srv.close()


def test_the_studio_files_and_nothing_else(server):
    for path, kind in (("/", "text/html"), ("/studio/studio.js", "text/javascript"),
                       ("/studio/studio.css", "text/css")):
        with urllib.request.urlopen(root(server).rstrip("/") + path, timeout=30) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith(kind)
    for path, message in (("studio/app.py", "no studio file 'app.py'"), ("studio/..%2fapp.py", "no route")):
        with pytest.raises(urllib.error.HTTPError) as err:  # only the page's own files, never a module's source
            urllib.request.urlopen(root(server) + path, timeout=30)
        assert err.value.code == 404 and message in json.loads(err.value.read())["error"]["message"]


def post(srv, body, expect_error=False):
    req = urllib.request.Request(srv.url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if not expect_error:
            raise
        return exc.code, json.loads(exc.read())
