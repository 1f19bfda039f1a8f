// The arena page's wiring: the API key, the preset list, one run of every column at once, cancel,
// the chart and the JSON export. Every call goes to kvmux's public API with the key field's value.

import { ApiError, getJSON, isAbort, storedKey, storeKey, streamChat } from "./api.js";
import { renderChart } from "./chart.js";
import { problemText, ResultColumn } from "./column.js";
import { LaneEditors } from "./lanes.js";

const $ = (id) => document.getElementById(id);

const page = {
  editors: new LaneEditors($("lane-editors"), $("add-lane")),
  columns: [],
  controllers: new Set(), // one per running column; Cancel aborts them all
  model: null,
  settings: null,
  startedAt: null,
};

const key = () => $("api-key").value.trim();
const running = () => page.controllers.size > 0;

function notify(message) {
  $("notice").textContent = message || "";
  $("notice").hidden = !message;
}

function say(message) {
  $("run-status").textContent = message;
}

async function loadServer() {
  document.body.dataset.server = "loading";
  try {
    const [policies, models] = await Promise.all([getJSON("/v1/policies", key()), getJSON("/v1/models", key())]);
    page.model = models.data.length ? models.data[0].id : null;
    $("model").textContent = `model: ${page.model ?? "unknown"}`;
    page.editors.setPresets(policies.data, policies.default);
    notify("");
    document.body.dataset.server = "ready";
  } catch (error) {
    const reason = error instanceof ApiError ? problemText(error, Boolean(key())) : error.message;
    notify(`Could not load the presets. ${reason}`);
    document.body.dataset.server = "unreachable";
  }
}

function readSettings() {
  const maxTokens = Number($("max-tokens").value);
  const temperature = Number($("temperature").value);
  const question = $("question").value.trim();
  const problems = [];
  if (!question) problems.push("Write a question or prompt.");
  if (!Number.isInteger(maxTokens) || maxTokens < 1) problems.push("Max tokens must be a whole number of at least 1.");
  if (!Number.isFinite(temperature) || temperature < 0) problems.push("Temperature must be a number of at least 0.");
  if (problems.length) {
    say(problems.join(" "));
    return null;
  }
  const context = $("context").value;
  return { context, question, max_tokens: maxTokens, temperature, ignore_eos: $("ignore-eos").checked };
}

/** The chat request of one column: context then question; the question as kv_policy.query with a context. */
function requestBody(lane, settings) {
  const content = settings.context.trim() ? `${settings.context}\n\n${settings.question}` : settings.question;
  const spec = { ...lane.overrides };
  if (settings.context.trim() && spec.query === undefined) spec.query = settings.question;
  const body = {
    messages: [{ role: "user", content }],
    max_tokens: settings.max_tokens,
    temperature: settings.temperature,
    kv_policy: Object.keys(spec).length ? { preset: lane.preset, ...spec } : lane.preset,
  };
  if (settings.ignore_eos) body.ignore_eos = true;
  return body;
}

function updateControls() {
  $("run").disabled = running();
  $("cancel").disabled = !running();
  $("export").disabled = running() || page.columns.length === 0;
}

function drawChart() {
  const rows = page.columns.map((column, i) => ({
    label: `${i + 1}. ${column.lane.preset}`,
    kvPercent: column.kvPercent,
    ttftMs: column.ttftMs,
  }));
  const any = rows.some((row) => row.kvPercent !== null || row.ttftMs !== null);
  $("chart-box").hidden = !any;
  if (any) renderChart($("chart"), rows);
}

async function runColumn(column) {
  const controller = new AbortController();
  page.controllers.add(controller);
  column.reset();
  updateControls();
  try {
    await streamChat(column.body, key(), controller.signal, (chunk) => column.onChunk(chunk));
    column.finish("done");
  } catch (error) {
    if (isAbort(error) || controller.signal.aborted) column.finish("cancelled");
    else if (error instanceof ApiError) column.finish("error", error, Boolean(key()));
    else column.finish("error", new ApiError(0, `The answer could not be read: ${error.message}`));
  } finally {
    page.controllers.delete(controller);
    updateControls();
    drawChart();
    if (!running()) say(summary());
  }
}

function summary() {
  const counts = {};
  for (const column of page.columns) counts[column.state] = (counts[column.state] || 0) + 1;
  return "Finished: " + Object.entries(counts).map(([state, n]) => `${n} ${state}`).join(", ") + ".";
}

async function run() {
  if (running()) return;
  if (page.editors.presets.length === 0) {
    say("No presets yet: the preset list did not load (see the message above).");
    return;
  }
  const lanes = page.editors.lanes();
  const settings = readSettings();
  if (!lanes) say("Fix the overrides marked below (they must be a JSON object).");
  if (!lanes || !settings) return;
  page.settings = settings;
  page.startedAt = new Date().toISOString();
  page.columns = lanes.map((lane) => {
    const column = new ResultColumn(lane, () => runColumn(column));
    column.body = requestBody(lane, settings);
    return column;
  });
  $("columns").replaceChildren(...page.columns.map((column) => column.root));
  say(`Running ${lanes.length} presets…`);
  await Promise.all(page.columns.map(runColumn));
}

function cancel() {
  for (const controller of page.controllers) controller.abort();
  say("Cancelling…");
}

function exportRun() {
  const record = {
    format: "kvmux-arena-run",
    version: 1,
    started_at: page.startedAt,
    exported_at: new Date().toISOString(),
    server: location.origin,
    model: page.model,
    settings: page.settings,
    columns: page.columns.map((column) => column.record()),
  };
  const blob = new Blob([JSON.stringify(record, null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const stamp = page.startedAt.replace(/[:.]/g, "-");
  const link = Object.assign(document.createElement("a"), { href: url, download: `kvmux-arena-${stamp}.json` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function showContextSize() {
  const chars = $("context").value.length;
  $("context-size").textContent = chars ? `${chars.toLocaleString("en")} characters` : "";
}

function loadContextFile() {
  const file = $("context-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    $("context").value = reader.result;
    showContextSize();
  };
  reader.onerror = () => notify(`Could not read ${file.name}: ${reader.error ? reader.error.message : "unknown error"}.`);
  reader.readAsText(file);
}

$("api-key").value = storedKey();
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  storeKey(key());
  loadServer();
});
$("run-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run();
});
$("cancel").addEventListener("click", cancel);
$("export").addEventListener("click", exportRun);
$("context").addEventListener("input", showContextSize);
$("context-file").addEventListener("change", loadContextFile);
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
    event.preventDefault();
    run();
  } else if (event.key === "Escape" && running()) {
    cancel();
  }
});
loadServer();
