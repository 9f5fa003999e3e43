"""The steering studio in headless Chromium against a real server on SmolLM2-135M-Instruct (issue 29): what the
page adds to the time to the first streamed token, and the screenshot docs/studio.md shows.

The server is ``steerscale serve``'s application (``App`` under uvicorn on a free port, the engine loop) with one
vector registered as ``formal``. Each round, in alternating order: the steered request alone through the API
(``http.client``, streamed, time from sending to the first content chunk) and the same request from the page (the
strength slider nudged, so only the steered column runs; the page's own ``performance.now()`` from ``fetch`` to the
first content chunk shown, ``data-ttft-ms``). The page's overhead is the paired difference, median over rounds;
and, apart from the server's noise, the page's own processing of the first chunk: from the stream read that
delivered it to the text in the column (``data-ttft-ms`` - ``data-first-read-ms``). The screenshot (``--shot``)
shows the four columns: the strategy column runs ``--shot-strategy`` (n=2) once, before the timed rounds.
Needs Debian's chromium and chromium-driver and selenium (pip install -e .[dev]). The last line is one JSON object.

Example: python bench/studio.py --vector out/calibrate/calibrated.safetensors --shot docs/img/studio.png
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from steerscale.models.loading import load_model
from steerscale.serve import App, start_server
from steerscale.steer.vector import SteeringVector


def api_ttft(port: int, body: dict) -> float:
    """Milliseconds from sending a streamed request to its first content chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    for raw in resp:
        line = raw.decode().strip()
        if first is None and line.startswith("data:") and '"content"' in line and '"content": ""' not in line:
            first = (time.perf_counter() - start) * 1000
    conn.close()
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vector", required=True, help="the vector registered as 'formal'")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--prompt", default="How was your weekend?")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--shot", default=None, help="save a screenshot of the page after the first send")
    ap.add_argument("--shot-strategy", default="majority", help="the strategy column in the screenshot ('': none)")
    args = ap.parse_args()

    lm = load_model("smollm2-135m-instruct")
    server = start_server(App(lm.model, lm.tokenizer, lm.layout, model_id="smollm2-135m-instruct",
                              vectors={"formal": SteeringVector.load(args.vector)}))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = WebDriverWait(driver, 300, poll_frequency=0.02)

    def column(name, attr):
        return driver.find_element(By.ID, f"col-{name}").get_attribute(attr)

    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        for element_id, value in (("prompt", args.prompt), ("max-tokens", str(args.max_tokens)), ("vector", "formal")):
            el = driver.find_element(By.ID, element_id)
            el.clear()
            el.send_keys(value)
        slider = driver.find_element(By.ID, "scale")
        driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                              slider, str(args.scale))
        shown = ["plain", "steered", "prompt"]
        if args.shot and args.shot_strategy:
            Select(driver.find_element(By.ID, "strategy")).select_by_value(args.shot_strategy)
            driver.find_element(By.ID, "strategy-n").clear()
            driver.find_element(By.ID, "strategy-n").send_keys("2")
            shown.append("scaled")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: all(column(c, "data-state") in ("done", "error") for c in shown))
        if args.shot:
            driver.save_screenshot(args.shot)
        Select(driver.find_element(By.ID, "strategy")).select_by_value("")  # the timed rounds: steered column only
        texts = {c: driver.find_element(By.CSS_SELECTOR, f"#col-{c} .output").text for c in shown}
        page, api, processing = [], [], []
        for r in range(args.rounds):
            scale = float(slider.get_attribute("value"))
            body = {"model": "smollm2-135m-instruct", "stream": True, "temperature": 0, "max_tokens": 8,
                    "messages": [{"role": "user", "content": args.prompt}],
                    "steer": [{"vector": "formal", "scale": scale + 0.5, "scope": "all"}]}
            driver.find_element(By.ID, "max-tokens").clear()
            driver.find_element(By.ID, "max-tokens").send_keys("8")

            def from_page():
                run = int(column("steered", "data-run"))
                slider.send_keys(Keys.ARROW_RIGHT)  # +0.5: one debounced request, steered column only
                wait.until(lambda d: int(column("steered", "data-run")) > run
                           and column("steered", "data-state") == "done")
                page.append(float(column("steered", "data-ttft-ms")))
                processing.append(page[-1] - float(column("steered", "data-first-read-ms")))

            first, second = (from_page, lambda: api.append(api_ttft(server.port, body))) if r % 2 else \
                (lambda: api.append(api_ttft(server.port, body)), from_page)
            first()
            second()
            print(f"round {r}: page {page[-1]:.1f} ms, API alone {api[-1]:.1f} ms, page's own processing of the first "
                  f"chunk {processing[-1]:.2f} ms", flush=True)
    finally:
        driver.quit()
        server.close()
    overhead = [p - a for p, a in zip(page, api)]
    print(json.dumps({"bench": "studio", "ttft_page_ms": round(statistics.median(page), 1),
                      "ttft_api_ms": round(statistics.median(api), 1),
                      "page_overhead_ms": round(statistics.median(overhead), 1),
                      "page_overhead_ms_range": [round(min(overhead), 1), round(max(overhead), 1)],
                      "page_processing_ms": round(statistics.median(processing), 2),
                      "page_processing_ms_max": round(max(processing), 2), "load_average": round(os.getloadavg()[0], 2),
                      "rounds": len(page), "texts": texts}))


if __name__ == "__main__":
    main()
