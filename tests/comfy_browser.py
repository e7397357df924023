"""Headless Chromium on a real ComfyUI page (Playwright driving Debian's chromium), and the tool that makes the
UI-format workflows from their API twins:

    COMFYUI_PATH=... python -m tests.comfy_browser     # rewrites workflows/*.json from workflows/api/*.json
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from .comfy_server import WORKFLOWS

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def comfy_page(server):
    """A page with the ComfyUI frontend loaded; yields (page, console messages [(type, text)])."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            console = []
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
            page.goto(f"http://127.0.0.1:{server.port}/", wait_until="load", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
            yield page, console
        finally:
            browser.close()


def export_ui_workflows(server) -> list:
    """workflows/api/<name>.json -> workflows/<name>.json in UI format, built by the frontend itself."""
    written = []
    with comfy_page(server) as (page, _):
        for api_file in sorted((WORKFLOWS / "api").glob("*.json")):
            graph = page.evaluate("""async (api) => {
                await window.app.loadApiJson(api, 'workflow.json');
                window.app.graph.arrange?.();
                return window.app.graph.serialize();
            }""", json.loads(api_file.read_text()))
            target = WORKFLOWS / api_file.name
            target.write_text(json.dumps(graph, indent=1) + "\n")
            written.append(target)
    return written


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    from .comfy_server import start_server

    srv = start_server(Path(tempfile.mkdtemp()))
    try:
        for path in export_ui_workflows(srv):
            print(path)
    finally:
        srv.stop()
