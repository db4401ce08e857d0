// Drives Debian's chromium (playwright-core, no downloaded browser) against the real ComfyUI
// frontend of a running test server, and writes what it saw as JSON. tests/test_browser.py
// runs it and makes the assertions; this script only observes.
//
//   node check_frontend.cjs CONFIG.json
//
// CONFIG: {url, pack, extension, nodes: [{name, display_name, description}], workflows: [name],
//          blueprints: [{name, category, sources: {id: {type, title, widgets}}, links: [[source, slot, input]], widgets: {name: value},
//                        output, prefix, screenshot}],
//          graphs: [{name, workflow}], searches: [{query, expect}], error_check: {workflow, node, widget, value},
//          settings: [{id, probe}],
//          screenshot_dir, result_path, chromium, user_data_dir}
"use strict";

const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
];
const VIEWPORT = { width: 1920, height: 1200 };
// The frontend checks model files and media after a graph loads, asynchronously: wait this long
// before reading its error outlines (the outline self-check proves it is long enough).
const ERROR_SCAN_MS = 1500;

const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const packPrefix = `/extensions/${config.pack}/`;
const templatePrefix = `/api/workflow_templates/${config.pack}/`;
const result = {
  extension_registered: false,
  console_errors: [],      // every console error / page error, for the report
  extension_errors: [],    // those that come from the pack's scripts
  failed_pack_requests: [],
  search: {},
  styles: {},
  workflows: {},
  blueprints: {},
  graphs: {},
  alias_searches: [],
  settings: {},
  screenshots: [],
  timings: {},
  fatal: null,
};

const squash = (text) => String(text ?? "").replace(/\s+/g, " ").trim();
const mentionsPack = (text) => String(text ?? "").includes(packPrefix);

function watch(page) {
  page.on("console", (msg) => {
    if (msg.type() !== "error") return;
    const location = msg.location()?.url ?? "";
    const entry = { text: msg.text().slice(0, 2000), location };
    result.console_errors.push(entry);
    if (mentionsPack(location) || mentionsPack(entry.text)) result.extension_errors.push(entry);
  });
  page.on("pageerror", (error) => {
    const entry = { text: `${error.name}: ${error.message}`.slice(0, 2000), location: (error.stack ?? "").slice(0, 2000) };
    result.console_errors.push(entry);
    if (mentionsPack(entry.location) || mentionsPack(entry.text)) result.extension_errors.push(entry);
  });
  page.on("response", (response) => {
    const url = response.url();
    if ((mentionsPack(url) || url.includes(templatePrefix)) && response.status() >= 400) {
      result.failed_pack_requests.push({ url, status: response.status() });
    }
  });
  page.on("requestfailed", (request) => {
    if (mentionsPack(request.url()) || request.url().includes(templatePrefix)) {
      result.failed_pack_requests.push({ url: request.url(), status: request.failure()?.errorText ?? "failed" });
    }
  });
}

async function timed(name, fn) {
  const start = Date.now();
  try {
    return await fn();
  } finally {
    result.timings[name] = (Date.now() - start) / 1000;
  }
}

async function screenshot(page, name) {
  if (!config.screenshot_dir) return;
  fs.mkdirSync(config.screenshot_dir, { recursive: true });
  const file = path.join(config.screenshot_dir, `${name}.png`);
  await page.screenshot({ path: file });
  result.screenshots.push(file);
}

async function closeDialogs(page) {
  for (let i = 0; i < 3 && (await page.locator(".p-dialog, [data-testid=dialog-overlay]").count()); i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(200);
  }
}

async function setSetting(page, id, value) {
  await page.evaluate(([id, value]) => window.app.extensionManager?.setting?.set(id, value), [id, value])
    .catch(() => {});
}

// A pack setting as the frontend has it (its definition, its value), and where setting it from the
// frontend stores it: the server's GET /settings/<id> after set(id, probe); the value is put back.
async function checkSetting(page, setting) {
  return page.evaluate(async ({ id, probe }) => {
    const store = window.app.extensionManager.setting;
    const definition = window.app.ui.settings.settingsLookup?.[id];
    const before = store.get(id);
    await store.set(id, probe);
    const stored = await (await fetch(`api/settings/${encodeURIComponent(id)}`)).json();
    await store.set(id, before);
    const restored = await (await fetch(`api/settings/${encodeURIComponent(id)}`)).json();
    return {
      registered: Boolean(definition),
      name: definition?.name ?? null, type: definition?.type ?? null, category: definition?.category ?? null,
      default_value: definition?.defaultValue ?? null, tooltip: definition?.tooltip ?? "",
      value: before, stored_after_set: stored, stored_after_restore: restored,
    };
  }, setting);
}

async function openSearchBox(page) {
  // A dialog that opens late (the template browser on a first visit) swallows the double
  // click: close dialogs and try again until the search box is there.
  for (let attempt = 0; attempt < 4; attempt++) {
    await closeDialogs(page);
    await page.evaluate(() => window.app.graph.clear());
    await page.mouse.dblclick(VIEWPORT.width / 2, VIEWPORT.height / 2);
    try {
      await page.getByTestId("search-filter-input").waitFor({ state: "visible", timeout: 3000 });
      return true;
    } catch {
      await page.keyboard.press("Escape");
    }
  }
  return false;
}

const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

// The result row of the node called `wanted` (a row starts with the node's display name; a
// blueprint whose name contains it is another row).
async function searchFor(page, query, wanted, timeout) {
  if (!(await openSearchBox(page))) return null;
  await page.keyboard.type(query, { delay: 5 });
  const items = page.getByTestId("result-item");
  try {
    await items.filter({ hasText: new RegExp(`^\\s*${escapeRegExp(wanted)}`) }).first().waitFor({ timeout });
  } catch {
    await page.keyboard.press("Escape");
    return null;
  }
  const texts = (await items.allInnerTexts()).map(squash);
  await page.keyboard.press("Escape");
  return texts.find((text) => text.startsWith(wanted)) ?? null;
}

async function checkSearch(page, node) {
  const wanted = squash(node.display_name || node.name);
  // What a user types: the display name; the node id as well, which the search also indexes.
  const canFallBack = node.name !== wanted;
  let match = await searchFor(page, wanted, wanted, canFallBack ? 3000 : 10000);
  let query = wanted;
  if (match === null && canFallBack) {
    match = await searchFor(page, node.name, wanted, 10000);
    query = node.name;
  }
  // The result row shows the description (cut by CSS only); compare its beginning.
  const head = squash(node.description).slice(0, 80);
  return {
    found: match !== null,
    query,
    description_shown: Boolean(match && head && match.includes(head)),
    result_text: match ?? "",
  };
}

async function checkStyle(page, node) {
  // Add the node through the app, as the search box's Enter does, and read what the extension set.
  return page.evaluate((type) => {
    const graphNode = window.LiteGraph.createNode(type);
    if (!graphNode) return { created: false };
    window.app.graph.add(graphNode);
    const badges = (graphNode.badges ?? []).filter((b) => b && typeof b === "object" && b.qkvMethodBadge);
    return {
      created: true,
      color: graphNode.color ?? null,
      bgcolor: graphNode.bgcolor ?? null,
      badge: badges.length ? badges[0].text : null,
      width: graphNode.size?.[0] ?? null,
    };
  }, node.name);
}

async function fitView(page) {
  await page.evaluate(() => {
    if (!window.app.graph.nodes.length) return;  // the frontend answers an empty canvas with an error toast
    window.app.canvas.deselectAll?.();
    return window.app.extensionManager.command.execute("Comfy.Canvas.FitView");
  }).catch(() => {});
  await page.waitForTimeout(600);
}

// Nodes the canvas outlines in red (missing model, missing media, node errors), subgraphs included.
async function errorOutlines(page) {
  return page.evaluate(() => {
    const found = [];
    const walk = (graph, path) => {
      for (const node of graph.nodes ?? []) {
        const id = [...path, node.id].join(":");
        if (node.has_errors) found.push({ id, type: node.type, title: node.title });
        if (node.subgraph) walk(node.subgraph, [...path, node.id]);
      }
    };
    walk(window.app.graph, []);
    return found;
  });
}

// Pairs of top-level nodes whose rendered boxes (title bar included, as the frontend lays them
// out) intersect: a docs screenshot where one node hides another.
async function overlappingNodes(page) {
  return page.evaluate(() => {
    const boxes = window.app.graph.nodes.map((n) => {
      const r = n.boundingRect ?? [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30];
      return { title: n.title, x0: r[0], y0: r[1], x1: r[0] + r[2], y1: r[1] + r[3] };
    });
    const pairs = [];
    for (let i = 0; i < boxes.length; i++) {
      for (let j = i + 1; j < boxes.length; j++) {
        const a = boxes[i], b = boxes[j];
        if (a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1) pairs.push([a.title, b.title]);
      }
    }
    return pairs;
  });
}

async function missingTypes(page) {
  return page.evaluate(() => {
    const missing = [];
    const walk = (graph) => {
      for (const node of graph.nodes ?? []) {
        if (!node.subgraph && !window.LiteGraph.registered_node_types[node.type]) missing.push(node.type);
        if (node.subgraph) walk(node.subgraph);
      }
    };
    walk(window.app.graph);
    return missing;
  });
}

// What the frontend would queue and what it would save (Export), for the CLI to be compared with.
async function capturePrompt(page) {
  return page.evaluate(async () => {
    const { workflow, output } = await window.app.graphToPrompt();
    return { workflow, prompt: output };
  });
}

async function openTemplate(page, name) {
  await closeDialogs(page);
  const folder = page.getByText(config.pack, { exact: true });
  if (!(await folder.count())) {
    await page.locator(".side-tool-bar-container").getByText("Templates", { exact: true }).click();
  }
  await folder.first().click({ timeout: 20000 });
  const card = page.getByTestId(`template-workflow-${name}`);
  await card.waitFor({ timeout: 20000 });
  await card.click();
  await page.waitForFunction(
    (name) => {
      const active = window.app.extensionManager?.workflow?.activeWorkflow;
      return window.app.graph.nodes.length > 0 && (!active || String(active.path ?? "").includes(name));
    },
    name, { timeout: 20000 });
  await page.waitForTimeout(800);
}

async function checkWorkflow(page, name) {
  const entry = { opened: false, missing_types: [], missing_toast: "", node_count: 0, types: [] };
  try {
    await openTemplate(page, name);
    entry.opened = true;
  } catch (error) {
    entry.error = String(error.message ?? error).slice(0, 1000);
    return entry;
  }
  const state = await page.evaluate(() => {
    const nodes = window.app.graph.nodes;
    return {
      types: nodes.map((n) => n.type),
      missing: nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type),
    };
  });
  entry.types = state.types;
  entry.node_count = state.types.length;
  entry.missing_types = state.missing;
  // The frontend's error overlay names missing nodes ("Missing node: X"); missing model
  // files (the test server has none of the real ones) are reported there too and are fine.
  const overlay = page.getByTestId("error-overlay");
  if (await overlay.count()) {
    entry.error_overlay = squash(await overlay.first().innerText()).slice(0, 500);
    if (/missing node/i.test(entry.error_overlay)) entry.missing_toast = entry.error_overlay;
    await overlay.first().getByRole("button", { name: "Close" }).click().catch(() => {});
  }
  await page.waitForTimeout(ERROR_SCAN_MS);
  entry.error_outlines = await errorOutlines(page);
  entry.overlaps = await overlappingNodes(page);
  Object.assign(entry, await capturePrompt(page));
  await fitView(page);
  await screenshot(page, `workflow_${name}`);
  return entry;
}

// Proves the error-outline check can fail: a workflow naming a model file the server does not
// have must show the outline on that loader.
async function checkErrorOutlineDetection(page, check) {
  const workflow = JSON.parse(JSON.stringify(check.workflow));
  const node = workflow.nodes.find((n) => n.id === check.node);
  node.widgets_values[0] = check.value;
  await page.evaluate((wf) => window.app.loadGraphData(wf), workflow);
  await page.waitForTimeout(ERROR_SCAN_MS);
  const overlay = page.getByTestId("error-overlay");
  if (await overlay.count()) await overlay.first().getByRole("button", { name: "Close" }).click().catch(() => {});
  return { error_outlines: await errorOutlines(page), node: check.node };
}

async function checkGraph(page, graph) {
  await page.evaluate((wf) => window.app.loadGraphData(wf), graph.workflow);
  await page.waitForTimeout(ERROR_SCAN_MS);
  const entry = { missing_types: await missingTypes(page), error_outlines: await errorOutlines(page) };
  const overlay = page.getByTestId("error-overlay");
  if (await overlay.count()) await overlay.first().getByRole("button", { name: "Close" }).click().catch(() => {});
  return Object.assign(entry, await capturePrompt(page));
}

async function openNodeLibrary(page) {
  await closeDialogs(page);
  if (!(await page.getByText("Comfy Blueprints", { exact: true }).count())) {
    await page.locator(".side-tool-bar-container").getByText("Nodes", { exact: true }).click();
    await page.getByText("Comfy Blueprints", { exact: true }).waitFor({ timeout: 20000 });
  }
}

async function closeNodeLibrary(page) {
  if (await page.getByText("Comfy Blueprints", { exact: true }).count()) {
    await page.locator(".side-tool-bar-container").getByText("Nodes", { exact: true }).click();
    await page.waitForTimeout(300);
  }
}

// The blueprint from the node library (Subgraph Blueprints > Comfy Blueprints > the pack's
// category), dragged onto the canvas as a user does, wired to loaders and a SaveImage, run-ready.
async function checkBlueprint(page, blueprint) {
  const entry = { in_library: false, dropped: false, missing_types: [], error_outlines: [] };
  await closeDialogs(page);
  // A new empty graph (not graph.clear(), which keeps the image previews of the old node ids).
  await page.evaluate(() => window.app.loadGraphData(
    { last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4 }));
  await openNodeLibrary(page);
  const item = page.getByRole("treeitem").filter({ hasText: blueprint.name }).first();
  if (!(await item.count())) {
    const blueprints = page.getByRole("treeitem").filter({ hasText: "Comfy Blueprints" }).first();
    if ((await blueprints.getAttribute("aria-expanded")) !== "true") await blueprints.click();
    const folder = page.getByRole("treeitem").filter({ hasText: blueprint.category }).first();
    await folder.waitFor({ timeout: 10000 });
    if ((await folder.getAttribute("aria-expanded")) !== "true") await folder.click();
  }
  try {
    await item.waitFor({ timeout: 10000 });
  } catch {
    entry.library_items = (await page.getByRole("treeitem").allInnerTexts()).map(squash).slice(0, 60);
    return entry;
  }
  entry.in_library = true;
  entry.library_path = await item.evaluate((el) => {
    const level = Number(el.getAttribute("aria-level"));
    const path = [];
    for (let e = el.previousElementSibling, want = level - 1; e && want > 0; e = e.previousElementSibling) {
      if (Number(e.getAttribute("aria-level")) === want) { path.unshift(e.innerText.trim()); want--; }
    }
    return path;
  });
  await item.dragTo(page.locator("#graph-canvas"), { targetPosition: { x: 1100, y: 500 } });
  await page.waitForTimeout(1000);
  const wired = await page.evaluate((bp) => {
    const graph = window.app.graph;
    const node = graph.nodes.find((n) => n.subgraph && n.title === bp.name);
    if (!node) return { dropped: false, types: graph.nodes.map((n) => n.type) };
    const sources = {};
    for (const [id, spec] of Object.entries(bp.sources)) {
      const source = window.LiteGraph.createNode(spec.type);
      if (spec.title) source.title = spec.title;
      graph.add(source);
      for (const [name, value] of Object.entries(spec.widgets)) {
        const widget = source.widgets?.find((w) => w.name === name);
        if (widget) widget.value = value;
      }
      sources[id] = source;
    }
    const unwired = [];
    for (const [id, slot, input] of bp.links) {
      const index = node.inputs.findIndex((i) => i.name === input);
      if (index < 0) unwired.push(input);
      else sources[id].connect(slot, node, index);
    }
    const save = window.LiteGraph.createNode("SaveImage");
    graph.add(save);
    save.widgets.find((w) => w.name === "filename_prefix").value = bp.prefix;
    node.connect(node.outputs.findIndex((o) => o.name === bp.output), save, 0);
    return { dropped: true, unwired, title: node.title, widgets: (node.widgets ?? []).map((w) => w.name) };
  }, blueprint);
  Object.assign(entry, wired);
  if (!entry.dropped) return entry;
  await closeNodeLibrary(page);
  await page.waitForTimeout(ERROR_SCAN_MS);  // image previews load and resize their nodes
  // Loaders in columns left of the subgraph node (nearest column first), the SaveImage right of
  // it: the screenshot shows the blueprint with its own defaults, as a user sees it after dropping it.
  await page.evaluate((name) => {
    const graph = window.app.graph;
    const node = graph.nodes.find((n) => n.subgraph && n.title === name);
    const columns = [[]];
    let height = 0;
    for (const other of graph.nodes) {
      if (other === node) continue;
      if (other.type === "SaveImage") { other.pos = [node.pos[0] + node.size[0] + 120, node.pos[1]]; continue; }
      // Image loaders grow when their preview arrives: leave room for it.
      if (other.widgets?.some((w) => w.name === "image")) other.setSize([Math.max(other.size[0], 320), Math.max(other.size[1], 400)]);
      if (height > 0 && height + other.size[1] > 900) { columns.push([]); height = 0; }
      columns.at(-1).push(other);
      height += other.size[1] + 70;
    }
    let right = node.pos[0] - 120;
    for (const column of columns) {
      const width = Math.max(...column.map((n) => n.size[0]));
      let y = node.pos[1];
      for (const other of column) {
        other.pos = [right - width, y];
        y += other.size[1] + 70;
      }
      right -= width + 80;
    }
    graph.setDirtyCanvas(true, true);
  }, blueprint.name);
  await page.waitForTimeout(500);  // a frame, so the moved nodes' bounds are current for the fit
  await fitView(page);
  if (blueprint.screenshot) await screenshot(page, blueprint.screenshot);
  entry.unset = await page.evaluate((bp) => {
    const node = window.app.graph.nodes.find((n) => n.subgraph && n.title === bp.name);
    const unset = [];
    for (const [name, value] of Object.entries(bp.widgets)) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (widget) widget.value = value;
      else unset.push(name);
    }
    return unset;
  }, blueprint);
  entry.missing_types = await missingTypes(page);
  entry.error_outlines = await errorOutlines(page);
  entry.overlaps = await overlappingNodes(page);
  Object.assign(entry, await capturePrompt(page));
  return entry;
}

// Proves the missing-node detection can fail: a workflow with an unknown node type must be
// reported by both the graph check and the frontend's own overlay.
async function checkMissingNodeDetection(page, name) {
  const entry = { missing_types: [], missing_toast: "" };
  const workflow = await page.evaluate(
    async ([pack, name]) => (await fetch(`/api/workflow_templates/${pack}/${name}.json`)).json(), [config.pack, name]);
  const victim = workflow.nodes.find((n) => !["MarkdownNote", "Note", "Reroute"].includes(n.type));
  victim.type = "QKVNoSuchNodeForTheBrowserTest";
  await page.evaluate((wf) => window.app.loadGraphData(wf), workflow);
  await page.waitForTimeout(1000);
  entry.missing_types = await page.evaluate(() =>
    window.app.graph.nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type));
  const overlay = page.getByTestId("error-overlay");
  if (await overlay.count()) {
    const text = squash(await overlay.first().innerText());
    if (/missing node/i.test(text)) entry.missing_toast = text.slice(0, 500);
    await overlay.first().getByRole("button", { name: "Close" }).click().catch(() => {});
  }
  return entry;
}

async function main() {
  const context = await chromium.launchPersistentContext(config.user_data_dir, {
    executablePath: config.chromium,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: VIEWPORT,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  watch(page);
  try {
    await timed("load", async () => {
      await page.goto(config.url, { waitUntil: "domcontentloaded" });
      await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.app?.extensionManager,
        null, { timeout: 120000 });
      await page.waitForFunction((name) => (window.app.extensions ?? []).some((e) => e.name === name),
        config.extension, { timeout: 30000 }).then(() => { result.extension_registered = true; }, () => {});
      await page.waitForTimeout(1500);
    });
    await setSetting(page, "Comfy.Minimap.Visible", false);
    // The test server has no real model files: keep the missing-model notice out of the
    // screenshots (missing *nodes* are still detected, from the graph itself).
    await setSetting(page, "Comfy.Workflow.ShowMissingModelsWarning", false);
    // Full-detail nodes in the screenshots of whole workflows (no low-quality zoomed-out view).
    await setSetting(page, "LiteGraph.Canvas.MinFontSizeForLOD", 0);
    await setSetting(page, "Comfy.Graph.CanvasInfo", false);  // no FPS counter in the screenshots
    await closeDialogs(page);

    await timed("settings", async () => {
      for (const setting of config.settings ?? []) result.settings[setting.id] = await checkSetting(page, setting);
    });

    await timed("search", async () => {
      for (const node of config.nodes) {
        const start = Date.now();
        result.search[node.name] = await checkSearch(page, node);
        result.search[node.name].seconds = (Date.now() - start) / 1000;
        if (node === config.nodes[0]) {
          // One screenshot of the search box with the pack's nodes listed.
          await openSearchBox(page);
          await page.keyboard.type("QKV", { delay: 5 });
          await page.waitForTimeout(1000);
          await screenshot(page, "node_search");
          await page.keyboard.press("Escape");
        }
      }
    });

    await timed("styles", async () => {
      await page.evaluate(() => window.app.graph.clear());
      for (const node of config.nodes) result.styles[node.name] = await checkStyle(page, node);
      // Lay the nodes out in columns (grouped by category) for the screenshot.
      await page.evaluate(() => {
        const nodes = [...window.app.graph.nodes].sort((a, b) =>
          String(a.constructor.category).localeCompare(String(b.constructor.category)) || a.title.localeCompare(b.title));
        let x = 0, y = 0, columnWidth = 0;
        for (const node of nodes) {
          if (y > 0 && y + node.size[1] > 1300) { x += columnWidth + 60; y = 0; columnWidth = 0; }
          node.pos = [x, y + 40];
          y += node.size[1] + 80;
          columnWidth = Math.max(columnWidth, node.size[0]);
        }
        window.app.graph.setDirtyCanvas(true, true);
      });
      await fitView(page);
      await screenshot(page, "pack_nodes");
    });

    await timed("alias_searches", async () => {
      for (const search of config.searches ?? []) {
        const match = await searchFor(page, search.query, search.expect, 10000);
        result.alias_searches.push({ ...search, found: match !== null, result_text: match ?? "" });
      }
    });

    await timed("workflows", async () => {
      for (const name of config.workflows) {
        const start = Date.now();
        result.workflows[name] = await checkWorkflow(page, name);
        result.workflows[name].seconds = (Date.now() - start) / 1000;
      }
      if (config.workflows.length) {
        result.missing_node_self_check = await checkMissingNodeDetection(page, config.workflows[0]);
      }
      if (config.error_check) result.error_outline_self_check = await checkErrorOutlineDetection(page, config.error_check);
    });

    await timed("blueprints", async () => {
      for (const blueprint of config.blueprints ?? []) result.blueprints[blueprint.name] = await checkBlueprint(page, blueprint);
      await closeNodeLibrary(page);
    });

    await timed("graphs", async () => {
      for (const graph of config.graphs ?? []) result.graphs[graph.name] = await checkGraph(page, graph);
    });
  } catch (error) {
    result.fatal = String(error.stack ?? error).slice(0, 4000);
    await screenshot(page, "failure").catch(() => {});
  } finally {
    await context.close().catch(() => {});
    fs.writeFileSync(config.result_path, JSON.stringify(result, null, 2));
  }
}

main().catch((error) => {
  result.fatal = String(error.stack ?? error);
  fs.writeFileSync(config.result_path, JSON.stringify(result, null, 2));
  process.exit(1);
});
