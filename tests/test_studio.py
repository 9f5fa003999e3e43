"""The steering studio (``GET /``, serve/studio.py) in a real headless Chromium -- Debian's ``chromium`` and
``chromium-driver``, driven by selenium -- against a real server (uvicorn on a port, the engine loop) on a tiny
random llama: the page loads without console errors and lists the server's vectors, a prompt streams into the
columns, moving the strength slider re-runs the steered column and not the plain one, an unknown vector shows the
server's own error text, and a server with an API key asks for it; the condition, scope, controller and strategy
pickers send what the API answers to, with the server's token counts and the strategy's spending under each column,
and a calibration file opened in the page shows its rows. Skipped, with the reason, where no browser is installed
(``.ci/run`` installs one)."""

import json
import shutil
import time
import urllib.error
import urllib.request

import pytest
import torch

from served import fixed_conditions, fixed_gates, random_controller, random_vectors
from steerscale.models.loading import LoadedModel
from steerscale.scale import STRATEGIES
from steerscale.serve import App, start_server
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
    vecs = random_vectors(layout)
    # 5 ms a forward pass: the tiny model would otherwise finish before the page sees a second chunk
    slow = model.register_forward_pre_hook(lambda *_: time.sleep(0.005))
    yield model, layout, vecs, fixed_conditions(layout), {"k": random_controller(layout, vecs["b"])}, fixed_gates(layout)
    slow.remove()
    torch.set_num_threads(threads)


def serve(parts, **kw):
    model, layout, vecs, conditions, controllers, gates = parts
    return start_server(App(model, ChatCharTokenizer(), layout, model_id="tiny", vectors=dict(vecs),
                            conditions=dict(conditions), controllers=dict(controllers), gates=dict(gates), **kw))


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
    assert "24 completion tokens" in plain["meta"]  # the usage chunk (stream_options.include_usage)
    el = browser.find_element(By.ID, "col-plain")  # the page's own work on the first chunk: read to shown
    assert 0 <= float(el.get_attribute("data-ttft-ms")) - float(el.get_attribute("data-first-read-ms")) < 50

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


def select_values(driver, element_id) -> list[str]:
    return [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, f"#{element_id} option")]


def pick(driver, element_id, value):
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def steered_once(driver, prompt="Hello there", tokens=12) -> dict:
    """Send, wait for every visible column, return the steered column."""
    before = col(driver, "steered")["run"]
    driver.find_element(By.ID, "send").click()
    shown = [c for c in ("plain", "steered", "prompt", "scaled")
             if driver.find_element(By.ID, f"col-{c}").is_displayed() or c != "scaled"]
    until(driver, lambda: col(driver, "steered")["run"] > before
          and all(col(driver, c)["state"] in ("done", "error") for c in shown), timeout=60)
    return col(driver, "steered")


def chat(srv, steer, prompt="Hello there", tokens=12, **extra):
    return post(srv, {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                      "temperature": 0, "steer": steer, **extra})


@needs_browser
def test_condition_scope_and_controller_pickers_send_what_the_api_answers(browser, server):
    open_page(browser, server)
    assert select_values(browser, "condition") == ["", "always", "never"]  # GET /v1/steering/conditions
    assert select_values(browser, "controller") == ["k"]  # GET /v1/steering/controllers
    assert browser.find_element(By.CSS_SELECTOR, "#kind option[value=feature]").get_attribute("disabled")  # no SAE
    set_value(browser, "prompt", "Hello there")
    set_value(browser, "max-tokens", "12")
    set_value(browser, "vector", "a")
    browser.find_element(By.ID, "scale").send_keys(Keys.END)  # x10
    plain_api = chat(server, [])["choices"][0]["message"]["content"]
    steered_api = chat(server, [{"vector": "a", "scale": 10}])["choices"][0]["message"]["content"]
    assert plain_api != steered_api

    pick(browser, "condition", "never")  # the condition never holds: the steered column is the plain reply
    got = steered_once(browser)
    assert got["text"] == plain_api and col(browser, "plain")["text"] == plain_api
    assert browser.find_element(By.CSS_SELECTOR, "#col-steered h2").text == "steered: a x10, if never"
    pick(browser, "condition", "always")
    assert steered_once(browser)["text"] == steered_api

    pick(browser, "condition", "")
    # a token gate (GET /v1/steering/gates): "open" fires at the last prompt token, so vector b then steers the
    # generated tokens; "shut" never fires, so the steered column is the plain reply
    assert select_values(browser, "gate") == ["", "open", "shut"]
    set_value(browser, "vector", "b")
    from_gate = chat(server, [{"vector": "b", "scale": 10, "gate": "open"}])["choices"][0]["message"]["content"]
    assert from_gate == chat(server, [{"vector": "b", "scale": 10, "scope": "generated"}])["choices"][0]["message"][
        "content"] != plain_api
    pick(browser, "gate", "open")
    assert steered_once(browser)["text"] == from_gate
    assert browser.find_element(By.CSS_SELECTOR, "#col-steered h2").text == "steered: b x10, from where open fires"
    pick(browser, "gate", "shut")
    assert steered_once(browser)["text"] == plain_api
    pick(browser, "gate", "")
    set_value(browser, "vector", "a")
    pick(browser, "scope", "generated")
    got = steered_once(browser)
    assert got["text"] == chat(server, [{"vector": "a", "scale": 10, "scope": "generated"}])["choices"][0][
        "message"]["content"]
    # token counts: the server's usage, as the API reports it for the same request
    usage = chat(server, [{"vector": "a", "scale": 10, "scope": "generated"}])["usage"]
    el = browser.find_element(By.ID, "col-steered")
    assert int(el.get_attribute("data-prompt-tokens")) == usage["prompt_tokens"]
    assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens" in got["meta"]
    pick(browser, "scope", "all")

    pick(browser, "kind", "controller")
    assert not browser.find_element(By.ID, "vector").is_displayed()
    got = steered_once(browser)
    controlled = chat(server, [{"controller": "k", "scale": 10}])["choices"][0]["message"]["content"]
    assert got["text"] == controlled and browser.find_element(By.CSS_SELECTOR, "#col-steered h2").text == \
        "steered: controller k x10"
    pick(browser, "kind", "vector")
    assert severe(browser) == []


@needs_browser
def test_the_strategy_column_runs_the_steered_request_under_a_budget(browser, server):
    open_page(browser, server)
    assert select_values(browser, "strategy") == ["", *STRATEGIES]  # GET /studio/strategies.json
    assert not browser.find_element(By.ID, "col-scaled").is_displayed()
    set_value(browser, "prompt", "Hello there")
    set_value(browser, "max-tokens", "8")
    set_value(browser, "vector", "b")
    browser.find_element(By.ID, "scale").send_keys(Keys.END)
    pick(browser, "strategy", "majority")
    set_value(browser, "strategy-n", "2")
    set_value(browser, "budget", "tokens=400")
    steered_once(browser)
    scaled = col(browser, "scaled")
    assert browser.find_element(By.ID, "col-scaled").is_displayed() and scaled["state"] == "done", scaled["error"]
    api = chat(server, [{"vector": "b", "scale": 10, "scope": "all"}], tokens=8,
               strategy={"name": "majority", "n": 2, "budget": "tokens=400"})
    assert scaled["text"] == api["choices"][0]["message"]["content"]
    info = api["steerscale"]
    assert info["budget"]["spent"]["generated_tokens"] > 0 and info["n_candidates"] == 2
    assert f"majority: 2 candidates, spent prompt_tokens {info['budget']['spent']['prompt_tokens']}, " \
           f"generated_tokens {info['budget']['spent']['generated_tokens']}" in scaled["meta"]
    assert "of generated_tokens=400" in scaled["meta"]
    set_value(browser, "budget", "tokens=lots")  # the server's own 400 text
    steered_once(browser)
    _, body = post(server, {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
                            "strategy": {"name": "majority", "budget": "tokens=lots"}}, expect_error=True)
    assert col(browser, "scaled")["error"] == body["error"]["message"]
    logged = severe(browser)  # the refused strategy request, and nothing else
    assert len(logged) == 1 and "chat/completions" in logged[0] and "400" in logged[0]
    pick(browser, "strategy", "")
    set_value(browser, "budget", "")
    steered_once(browser)
    assert not browser.find_element(By.ID, "col-scaled").is_displayed()


@needs_browser
def test_a_calibration_opened_in_the_page_shows_its_rows_and_plot(browser, server, parts, tmp_path):
    from steerscale.measure.calibrate import calibrate

    model, layout, vecs, *_ = parts
    lm = LoadedModel(model, ChatCharTokenizer(), layout, "tiny")
    pairs = [{"prompt": f"Q{i}: tell me", "positive": "AAAA BBBB", "negative": "zzzz yyyy"} for i in range(8)]
    cal = calibrate(lm, pairs, vector=vecs["a"], scales=(0.5, 1), max_kl=50.0, gen_tokens=0, n_neutral=4,
                    out_dir=tmp_path, progress=False, log=lambda *a: None)
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#calibration summary").click()
    browser.find_element(By.ID, "calibration-file").send_keys(str(tmp_path / "calibration.json"))
    until(browser, lambda: browser.find_element(By.ID, "calibration-verdict").text)
    assert browser.find_element(By.ID, "calibration-verdict").text.startswith(f"verdict: {cal.verdict[:40]}")
    cells = [[c.text for c in r.find_elements(By.CSS_SELECTOR, "th, td")]
             for r in browser.find_elements(By.CSS_SELECTOR, "#calibration-table tr")]
    assert cells[0][0] == "setting" and [c[0] for c in cells[1:]] == [r["label"] for r in cal.rows]
    browser.find_element(By.ID, "report-file").send_keys(str(tmp_path / "calibration.png"))
    until(browser, lambda: browser.execute_script(
        "const i = document.querySelector('#report-view img'); return i && i.complete && i.naturalWidth > 0"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    browser.find_element(By.ID, "calibration-file").send_keys(str(tmp_path / "bad.json"))
    until(browser, lambda: "not a steerscale calibration" in browser.find_element(By.ID, "calibration-verdict").text)
    assert severe(browser) == []


def test_the_studio_files_and_nothing_else(server):
    with urllib.request.urlopen(root(server) + "studio/strategies.json", timeout=30) as resp:
        listed = json.loads(resp.read())["data"]
    assert [s["id"] for s in listed] == list(STRATEGIES)
    assert "n" in next(s["knobs"] for s in listed if s["id"] == "majority")
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
