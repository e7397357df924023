"""The pack in ComfyUI's real frontend (headless Chromium): every node type and the extension register, every
UI workflow of workflows/ loads with its node types known, no console error names the pack, and the sampler shows
its clip progress. Skipped with one loud line without a ComfyUI, Playwright or Chromium."""

from __future__ import annotations

import importlib.util
import json

import pytest

from .comfy_browser import chromium_path, comfy_page
from .comfy_server import COMFYUI, EMO_NODES, WORKFLOWS, start_server

if importlib.util.find_spec("playwright") is None:
    MISSING = "Playwright is not installed (pip install playwright)"
else:
    MISSING = None if chromium_path() else "no chromium executable (apt-get install chromium)"
if COMFYUI is None:
    MISSING = "no ComfyUI (set COMFYUI_PATH)"
if MISSING:
    print("\n" + "=" * 78 + f"\nSKIPPED: ComfyUI browser tests: {MISSING}\n" + "=" * 78)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("comfyui-browser"))
    try:
        with comfy_page(server) as (page, console):
            yield server, page, console
    finally:
        server.stop()


def test_extension_and_nodes_register_once(page):
    server, page, console = page
    assert page.evaluate("() => app.extensions.filter(e => e.name === 'emo.comfyui').length") == 1
    registered = set(page.evaluate("() => Object.keys(LiteGraph.registered_node_types)"))
    assert EMO_NODES <= registered
    scripts = [s for s in server.get("/extensions") if "comfyui-emo" in s]
    assert scripts == ["/extensions/comfyui-emo/emo.js"]  # served once
    templates = server.get("/workflow_templates")
    assert sorted(templates.get("comfyui-emo", [])) == sorted(p.stem for p in UI_WORKFLOWS)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_loads(page, path):
    server, page, console = page
    graph = json.loads(path.read_text())
    api_twin = json.loads((WORKFLOWS / "api" / path.name).read_text())
    assert sorted(n["type"] for n in graph["nodes"]) == sorted(n["class_type"] for n in api_twin.values())
    result = page.evaluate("""async (graph) => {
        await app.loadGraphData(graph);
        const types = app.graph.nodes.map(n => n.type);
        return {count: app.graph.nodes.length, unknown: types.filter(t => !LiteGraph.registered_node_types[t])};
    }""", graph)
    assert result == {"count": len(graph["nodes"]), "unknown": []}
    errors = [text for kind, text in console if kind in ("error", "pageerror") and "emo" in text.lower()]
    assert errors == []


def test_sampler_shows_clip_progress(page):
    server, page, console = page
    status = page.evaluate("""async (graph) => {
        await app.loadGraphData(graph);
        const node = app.graph.nodes.find(n => n.type === 'EMOSampler');
        node.widgets.find(w => w.name === 'steps').value = 4;
        const { api } = await import('/scripts/api.js');
        api.dispatchCustomEvent('progress', {value: 7, max: 20, node: String(node.id), prompt_id: 'x'});
        return node.emoStatus;
    }""", json.loads((WORKFLOWS / "portrait_speech_to_video.json").read_text()))
    assert status == "clip 2/5 · step 3/4"
