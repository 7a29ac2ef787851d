"""A screenshot of a viewer page with one token's tooltip open (headless Chromium, offline).

python scripts/viewer_screenshot.py docs/monitor/generate.html docs/monitor/generate.png --token 12
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page")
    ap.add_argument("png")
    ap.add_argument("--token", type=int, default=0, help="the token whose tooltip is pinned")
    ap.add_argument("--size", default="1100,760")
    args = ap.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--window-size={args.size}",
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(Path(args.page).resolve().as_uri())
        driver.find_elements(By.CSS_SELECTOR, ".tok")[args.token].click()  # pins the tooltip
        driver.save_screenshot(args.png)
    finally:
        driver.quit()
    print(args.png)


if __name__ == "__main__":
    main()
