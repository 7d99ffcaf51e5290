"""Opens a run's report.html in headless Chromium (the system's, driven by Playwright over the DevTools protocol):
console errors, requests, the numbers it shows and a screenshot. Shared by the report tests and the README's
screenshot (`python tests/browser.py RUN_DIR OUT.png`)."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Debian's `chromium` package (.ci/run installs it); Playwright's own browser download needs a network
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def require_chromium() -> None:
    """Skip a browser test on a machine without chromium, saying so; fail instead where the browser is required
    (.ci/run installs it and sets MEDTUNE_REQUIRE_BROWSER)."""
    import os

    import pytest

    if chromium() is None:
        message = "no chromium on this machine: the browser check did not run (apt-get install chromium)"
        if os.environ.get("MEDTUNE_REQUIRE_BROWSER") or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    values: list[dict[str, Any]] = field(default_factory=list)  # [data-src] elements: src, value, text
    page_width: int = 0  # the document's scroll width (wider than the viewport: the page scrolls sideways)
    viewport_width: int = 0
    text: str = ""


def open_report(path: Path, viewport: dict[str, int], screenshot: Path | None = None) -> PageCheck:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    if executable is None:
        raise RuntimeError("no chromium on this machine (apt-get install chromium)")
    check = PageCheck(viewport_width=viewport["width"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport=viewport)
            page.on("console", lambda m: check.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: check.console_errors.append(f"page error: {e}"))
            page.on("request", lambda r: check.requests.append(r.url))
            page.goto(path.resolve().as_uri(), wait_until="load")
            check.values = page.eval_on_selector_all("[data-src]", "els => els.map(e => ({src: e.dataset.src, "
                                                     "value: e.dataset.value, text: e.textContent}))")
            check.page_width = page.evaluate("document.documentElement.scrollWidth")
            check.text = page.inner_text("body")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return check


def lookup(run_dir: Path, src: str) -> Any:
    """The value a `data-src` names: `FILE#a/b/0` (JSON pointer into a JSON file) or `FILE:LINE#key` (a JSONL
    line's key)."""
    where, _, pointer = src.partition("#")
    file, _, line = where.partition(":")
    text = (run_dir / file).read_text(encoding="utf-8")
    data = json.loads(text.splitlines()[int(line) - 1]) if line else json.loads(text)
    for part in pointer.split("/") if pointer else []:
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def expected_text(src: str, value: Any) -> str | None:
    """How the page must show a value read from `src`; None where the check is by magnitude (sizes)."""
    key = src.rsplit("/", 1)[-1].rsplit("#", 1)[-1]
    if key in ("accuracy", "extraction_failure_rate", "share_over_max_len") or "/ci95/" in src \
            or ("shares" in src and isinstance(value, float) and value <= 1):
        return f"{value:.1%}"
    if key == "top1_agreement":
        return f"{value:.2%}"
    if src.endswith("perplexity/value"):
        return f"{value:.3f}"
    if key == "bytes":
        return None
    if key == "finish_reason":
        return "stops" if value == "stop" else f"no ({value})"
    if key in ("extracted", "gold"):
        return "none" if value is None else str(value)
    if src.endswith(("tokenizer/identical", "tokenizer/texts")) or key == "sha256":
        return str(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def check_numbers(run_dir: Path, values: list[dict[str, Any]]) -> list[str]:
    """Every number the page tags with its source: its value equals the run file's, and its text shows that value.
    Returns the problems (empty when all agree)."""
    problems = []
    for v in values:
        actual = lookup(run_dir, v["src"])
        if json.loads(v["value"]) != actual:
            problems.append(f"{v['src']}: page has {v['value']}, the file {actual!r}")
            continue
        want = expected_text(v["src"], actual)
        text = v["text"].strip()
        if want is None:  # a size: "117.7 MB" within the rounding of its unit
            number, unit = text.split()
            if abs(float(number) * UNITS[unit] - actual) > 0.051 * UNITS[unit]:
                problems.append(f"{v['src']}: shows {text} for {actual} bytes")
        elif text != want:
            problems.append(f"{v['src']}: shows {text!r}, expected {want!r}")
    return problems


if __name__ == "__main__":  # python tests/browser.py RUN_DIR OUT.png [phone]
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    result = open_report(run / "report.html", PHONE if sys.argv[3:] == ["phone"] else DESKTOP, out)
    print(f"{out}: {len(result.values)} numbers, console errors: {result.console_errors or 'none'}, page width "
          f"{result.page_width} for a {result.viewport_width} px viewport")
