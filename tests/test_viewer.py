"""The HTML viewer in a real browser: headless Chromium (the README's test command installs it
from the system packages) with the network disabled, driven by Selenium."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import requires

requires("selenium", "browser")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from stable_regions.cli import main  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser and driver, (
        "the browser test needs Chromium and its driver: apt-get install chromium chromium-driver"
    )
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1200,900",
        # no network: every request would go to a closed local port or fail to resolve
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=options)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A page and its JSON from one run of ``generate`` on the bundled model."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("viewer")
    page = out / "generate.html"
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(
            [
                "generate",
                "The capital of France is",
                "--max-new-tokens",
                "8",
                "--eps",
                "0.1",
                "1",
                "--json",
                "--html",
                str(page),
            ]
        )
    assert code == 0
    return page, json.loads(buffer.getvalue())


def test_page_offline_tooltip_numbers_equal_json(browser, generated, tmp_path):
    page, doc = generated
    browser.get(page.as_uri())
    tokens = browser.find_elements(By.CSS_SELECTOR, ".tok")
    rows = sorted((r for r in doc["rows"] if r["eps"] == 0.1), key=lambda r: r["step"])
    assert len(tokens) == len(rows) == 8
    # nothing was fetched: no resource entries at all, and the page's script ran
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    for index in (0, 3, 7):
        ActionChains(browser).move_to_element(tokens[index]).perform()
        tip = browser.find_element(By.ID, "tip")
        assert tip.is_displayed()
        cells = {
            c.get_attribute("data-key"): c.text
            for c in tip.find_elements(By.CSS_SELECTOR, "td.v[data-key]")
        }
        row = rows[index]
        for key in (
            "radius_curve",
            "radius_quadratic",
            "radius_flip",
            "chosen_prob",
            "entropy",
            "lambda_max",
        ):
            assert float(cells[key]) == pytest.approx(row[key], rel=6e-4), key
        assert json.loads(tip.find_element(By.CSS_SELECTOR, ".head").text) == row["chosen_token"]
        alternatives = [json.loads(a.text) for a in tip.find_elements(By.CSS_SELECTOR, ".alt")]
        assert alternatives == row["top_tokens"]
    # another eps: the legend and the tooltip's radius follow it
    Select(browser.find_element(By.ID, "eps")).select_by_visible_text("1")
    tokens = browser.find_elements(By.CSS_SELECTOR, ".tok")
    ActionChains(browser).move_to_element(tokens[3]).perform()
    cell = browser.find_element(By.CSS_SELECTOR, "#tip td.v[data-key='radius_curve']")
    at_one = next(r for r in doc["rows"] if r["eps"] == 1.0 and r["step"] == 3)
    assert float(cell.text) == pytest.approx(at_one["radius_curve"], rel=6e-4)
    assert "at eps 1" in browser.find_element(By.ID, "legend-label").text
    # the plot has one point per token with a finite radius
    assert len(browser.find_elements(By.CSS_SELECTOR, "#plot circle")) == 8
    shot = tmp_path / "viewer.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_whitespace_is_visible(browser, generated):
    page, doc = generated
    browser.get(page.as_uri())
    prefix = browser.find_element(By.CSS_SELECTOR, ".prefix").text
    assert "·" in prefix and " " not in prefix.replace("\n", "")
    for r in doc["rows"]:
        if "\n" in r["chosen_token"]:
            marks = browser.find_elements(By.CSS_SELECTOR, ".tok .ws")
            assert any(m.text == "↵" for m in marks)
            break


def hover_values(browser, token) -> dict[str, str]:
    ActionChains(browser).move_to_element(token).perform()
    tip = browser.find_element(By.ID, "tip")
    return {
        c.get_attribute("data-key"): c.text
        for c in tip.find_elements(By.CSS_SELECTOR, "td.v[data-key]")
    }


def test_analyze_and_scan_pages(browser, tmp_path, capsys):
    page = tmp_path / "analyze.html"
    prompt = "The capital of France is"
    assert (
        main(["analyze", prompt, "--no-exact", "--eps", "0.1", "--json", "--html", str(page)]) == 0
    )
    doc = json.loads(capsys.readouterr().out)
    browser.get(page.as_uri())
    tokens = browser.find_elements(By.CSS_SELECTOR, ".tok")
    assert len(tokens) == len(doc["rows"])
    for i in (0, len(tokens) - 1):
        cells = hover_values(browser, tokens[i])
        row = doc["rows"][i]
        assert float(cells["radius_pade"]) == pytest.approx(row["radius_pade"], rel=6e-4)
        assert json.loads(cells["next_token"]) == row["next_token"]
    text = tmp_path / "doc.txt"
    text.write_text("Hello world.\nThe cat sat on the mat.\n")
    page = tmp_path / "scan.html"
    assert (
        main(["scan", str(text), "--out", str(tmp_path / "run"), "--html", str(page), "--top", "0"])
        == 0
    )
    capsys.readouterr()
    browser.get(page.as_uri())
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "run" / "results.parquet")
    tokens = browser.find_elements(By.CSS_SELECTOR, ".tok")
    assert len(tokens) == len(frame) and len(tokens) > 5
    cells = hover_values(browser, tokens[2])
    row = frame.sort_values("position").iloc[2]
    assert float(cells["lambda_max"]) == pytest.approx(row.lambda_max, rel=6e-4)
    alternatives = [json.loads(a.text) for a in browser.find_elements(By.CSS_SELECTOR, "#tip .alt")]
    assert alternatives == list(row.top_tokens)
