"""Each shipped UI workflow opened in ComfyUI's own frontend, as a user opens it: a headless ComfyUI with only this
pack enabled serves its frontend to a headless Chromium (driven by playwright), which loads every
``workflows/*.json`` with ``app.loadGraphData``. Node sizes are the frontend's own (``node.getBounding()``): it
grows a node to fit its widgets, so sizes saved in the file are only lower bounds.

Needs what the rest of this folder needs (COMFYUI_DIR, COMFYUI_PYTHON; skipped otherwise), plus the ``playwright``
package (the ``test`` extra) and a Chromium at /usr/bin/chromium (Debian: ``apt-get install chromium``; another
path via CHROMIUM). No model files are needed. About a minute on 2 CPU cores, most of it ComfyUI's start.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from itertools import combinations
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # comfy_server.py; tests/ is no package
comfy_server = importlib.import_module("comfy_server")

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Chromium without a display, GPU, sandbox (CI runs as root) or any traffic of its own to the internet.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1920, "height": 1080}
NOTE_TYPES = ("MarkdownNote", "Note")
PACK_NODE_TYPES = ("FluxLoraDataset", "FluxLoraCache", "FluxLoraMemory", "FluxLoraOptions", "FluxLoraTrain")

pytestmark = pytest.mark.skipif(not comfy_server.configured(), reason=comfy_server.SKIP_REASON)

# Load a workflow the way the frontend opens a file, then report what the frontend made of it. Bounds are
# [x, y, width, height] in graph units, title bar included; the canvas refreshes them each time it draws, so
# draw once before reading. Each note is also hit-tested in the view the workflow opens with (its saved
# zoom and offset): at sample points across the note, only the canvas and the note's own DOM widget (the
# rendered markdown) may be under the pointer, not the frontend's side bar, menus or panels.
LOAD_AND_MEASURE = """async ([workflow, noteTypes]) => {
    const app = window.app, LiteGraph = window.LiteGraph;
    const types = [...new Set(workflow.nodes.map((node) => node.type))];
    const unregistered = types.filter((type) => !(type in LiteGraph.registered_node_types));
    if (unregistered.length) return {unregistered};
    await app.loadGraphData(workflow);
    await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    app.canvas.draw(true, true);
    const canvas = app.canvas.canvas, origin = canvas.getBoundingClientRect();
    const nodes = app.graph._nodes.map((node) => ({
        id: node.id, type: node.type, title: node.title, bounds: Array.from(node.getBounding()),
    }));
    const hidden = {};
    for (const node of app.graph._nodes.filter((node) => noteTypes.includes(node.type))) {
        const own = (node.widgets || []).map((widget) => widget.element).filter(Boolean);
        const [x, y, w, h] = node.getBounding();
        const covered = [];
        for (const fx of [0.02, 0.25, 0.5, 0.75, 0.98]) {
            for (const fy of [0.02, 0.25, 0.5, 0.75, 0.98]) {
                const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([x + fx * w, y + fy * h]);
                const px = origin.left + cx, py = origin.top + cy;
                const stack = document.elementsFromPoint(px, py), at = `(${Math.round(px)}, ${Math.round(py)}) px`;
                if (!stack.includes(canvas)) {
                    covered.push(`${at} is outside the view`);
                    continue;
                }
                const above = stack.slice(0, stack.indexOf(canvas))
                    .filter((el) => !own.some((mine) => mine.contains(el) || el.contains(mine)));
                if (above.length) {
                    const [el] = above;
                    covered.push(`${at} is under ${el.tagName.toLowerCase()}.${String(el.className).split(' ')[0]}`);
                }
            }
        }
        if (covered.length) hidden[`${node.id} (${node.title})`] = covered;
    }
    return {unregistered, nodes, hidden};
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with comfy_server.start_comfyui(tmp_path_factory.mktemp("frontend")) as srv:
        # A new user's first visit opens the template browser over the canvas; this user has seen it.
        srv.request("/settings", {"Comfy.TutorialCompleted": True})
        yield srv


@pytest.fixture(scope="module")
def frontend(server):
    """A page with ComfyUI's frontend loaded, and every uncaught page error and console error or warning."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the frontend test needs playwright: pip install -e '.[test]' (or pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium, or set CHROMIUM to the browser's path")
    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        errors: list[str] = []

        def on_console(message):
            if message.type in ("error", "warning"):
                errors.append(f"console {message.type}: {message.text}")

        page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
        page.on("console", on_console)
        page.goto(server.url)
        page.wait_for_function("() => window.app?.canvas?.graph"
                               " && Object.keys(window.LiteGraph.registered_node_types).length",
                               timeout=120_000)
        page.wait_for_load_state("networkidle")
        print(f"\nfrontend {page.evaluate('window.__COMFYUI_FRONTEND_VERSION__')} ready after "
              f"{time.monotonic() - started:.1f} s")
        yield page, errors
        browser.close()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_opens_in_the_frontend_without_overlaps(frontend, server, path):
    page, errors = frontend
    workflow = json.loads(path.read_text(encoding="utf-8"))
    result = page.evaluate(LOAD_AND_MEASURE, [workflow, list(NOTE_TYPES)])
    assert not result["unregistered"], f"{path.name}: node types the frontend does not know: {result['unregistered']}"
    screenshot = server.base / "screenshots" / f"{path.stem}.png"
    screenshot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(screenshot))
    nodes = result["nodes"]
    assert sorted(str(node["id"]) for node in nodes) == sorted(str(node["id"]) for node in workflow["nodes"]), (
        f"{path.name}: the frontend did not load every node; errors: {errors}")
    unmeasured = [node for node in nodes if not (node["bounds"][2] > 0 and node["bounds"][3] > 0)]
    assert not unmeasured, f"{path.name}: the frontend has not sized these nodes: {unmeasured}"

    overlaps = []
    for a, b in combinations(nodes, 2):
        (ax, ay, aw, ah), (bx, by, bw, bh) = a["bounds"], b["bounds"]
        if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
            overlaps.append(f"{a['id']} {a['title']} {a['bounds']} and {b['id']} {b['title']} {b['bounds']}")
    assert not overlaps, f"{path.name}: nodes overlap as the frontend draws them (see {screenshot}):\n" + "\n".join(
        overlaps)
    assert not result["hidden"], (f"{path.name}: notes hidden behind the frontend's panels in the opening view "
                                  f"(see {screenshot}): {result['hidden']}")

    pack_names = (comfy_server.PACK_FOLDER, *PACK_NODE_TYPES)
    about_the_pack = [error for error in errors if any(name in error for name in pack_names)]
    assert not about_the_pack, f"{path.name}: the frontend reported errors about the pack: {about_the_pack}"
