"""The README's picture of the chat page: the model `glm-portable demo` tuned, asked twice in headless chromium.

    glm-portable demo --output /tmp/demo
    python scripts/screenshot_chat_page.py /tmp/demo docs/images/chat-page.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from bench_serve import start_server

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
QUESTIONS = ["类型#外套*颜色#黑色*材质#雪纺*图案#印花*风格#简约", "类型#裙*颜色#红色*材质#棉*风格#休闲"]


def main(demo: Path, out: Path) -> None:
    process, url = start_server(demo / "model", "cpu", 4, 256, 5, "--checkpoint", str(demo / "run"))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
            page = browser.new_page(viewport={"width": 1000, "height": 520})
            page.goto(url + "/")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "64")
            for turn, text in enumerate(QUESTIONS):
                page.fill("#input", text)
                page.click("#send")
                page.wait_for_function(
                    f"document.querySelectorAll('.message.assistant')[{turn}]?.dataset.state === 'done'")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/images/chat-page.png"))
