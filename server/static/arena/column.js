// One result column: a preset's streamed answer, its timings, its KV bar and policy figures, and
// what went wrong (busy server with its Retry-After, a refused key, a rejected request).

const STATUS_TEXT = {
  waiting: "waiting for the first token…",
  streaming: "streaming…",
  done: "done",
  cancelled: "cancelled",
};

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatBytes(bytes) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

/** The message shown for a failed call; `keyGiven` tells a missing key from a refused one. */
export function problemText(error, keyGiven) {
  if (error.kind === "auth") {
    return keyGiven
      ? "The server refused the API key (401). Check the API key field, then press Use key."
      : "This server needs an API key (401). Type it in the API key field, then press Use key.";
  }
  if (error.kind === "busy") {
    const wait = error.retryAfter ? ` Retry after ${error.retryAfter} s.` : "";
    return `The server is busy (${error.status}): ${error.message}${wait}`;
  }
  const where = error.param ? ` (${error.param})` : "";
  return error.status ? `Error ${error.status}${where}: ${error.message}` : error.message;
}

export class ResultColumn {
  /** `lane` = {preset, overrides}; `onRetry()` runs this column again. */
  constructor(lane, onRetry) {
    this.lane = lane;
    this.root = element("article", "column");
    this.root.dataset.preset = lane.preset;
    const heading = element("h3", "", lane.preset);
    const overrides = Object.keys(lane.overrides).length ? JSON.stringify(lane.overrides) : "preset values";
    this.status = element("p", "status");
    this.status.setAttribute("role", "status");
    this.answer = element("div", "answer");
    this.answer.tabIndex = 0;
    this.answer.setAttribute("aria-label", `Answer of ${lane.preset}`);
    this.kvText = element("p", "kv-text", "KV kept: —");
    this.kvFill = element("div", "kv-fill");
    this.kvBar = element("div", "kv-bar");
    this.kvBar.setAttribute("role", "img");
    this.kvBar.append(this.kvFill);
    this.figures = element("dl", "figures");
    this.problem = element("div", "problem");
    this.problemText = element("p", "problem-text");
    this.retry = element("button", "retry", "Retry this column");
    this.retry.type = "button";
    this.retry.addEventListener("click", onRetry);
    this.problem.append(this.problemText, this.retry);
    this.root.append(heading, element("p", "overrides muted", overrides), this.status, this.answer);
    this.root.append(this.kvText, this.kvBar, this.figures, this.problem);
    this.reset();
  }

  reset() {
    this.state = "waiting";
    this.text = "";
    this.chunks = 0;
    this.usage = null;
    this.kv = null;
    this.error = null;
    this.errorText = "";
    this.startedAt = performance.now();
    this.firstAt = null;
    this.lastAt = null;
    this.render();
  }

  onChunk(chunk) {
    const now = performance.now();
    if (chunk.usage) this.usage = chunk.usage;
    if (chunk.kv) this.kv = chunk.kv;
    const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta || {} : {};
    if (chunk.choices && chunk.choices.length) {
      if (this.firstAt === null) this.firstAt = now;
      this.lastAt = now;
      this.chunks += 1;
      this.text += delta.content || "";
      this.state = "streaming";
    }
    this.render();
  }

  finish(state, error = null, keyGiven = false) {
    this.state = state;
    this.error = error ? { status: error.status, kind: error.kind, retryAfter: error.retryAfter, message: error.message } : null;
    this.errorText = error ? problemText(error, keyGiven) : "";
    this.render();
  }

  get running() {
    return this.state === "waiting" || this.state === "streaming";
  }

  get ttftMs() {
    return this.firstAt === null ? null : this.firstAt - this.startedAt;
  }

  get decodeRate() {
    if (this.kv && this.kv.decode_tokens_per_s != null) return this.kv.decode_tokens_per_s;
    if (this.chunks < 2 || this.lastAt <= this.firstAt) return null;
    return ((this.chunks - 1) * 1000) / (this.lastAt - this.firstAt);
  }

  get cachedTokens() {
    const details = this.usage && this.usage.prompt_tokens_details;
    if (details && details.cached_tokens != null) return details.cached_tokens;
    return this.kv && this.kv.cached_tokens != null ? this.kv.cached_tokens : null;
  }

  get kvPercent() {
    if (!this.kv || !this.kv.kv_bytes_full) return null;
    return (100 * this.kv.kv_bytes_kept) / this.kv.kv_bytes_full;
  }

  render() {
    this.root.dataset.state = this.state;
    this.status.textContent = this.error ? this.errorTitle() : STATUS_TEXT[this.state];
    this.answer.textContent = this.text;
    this.problem.hidden = !this.error;
    this.problemText.textContent = this.errorText || "";
    this.retry.hidden = !this.error || ["auth", "bad_request"].includes(this.error.kind); // fix the key or input first
    this.renderKv();
    this.renderFigures();
  }

  errorTitle() {
    return { auth: "API key refused", busy: "server busy" }[this.error.kind] || "error";
  }

  renderKv() {
    const percent = this.kvPercent;
    this.kvBar.hidden = percent === null;
    if (percent === null) {
      this.kvText.textContent = "KV kept: —";
      return;
    }
    const kept = formatBytes(this.kv.kv_bytes_kept);
    const full = formatBytes(this.kv.kv_bytes_full);
    this.kvText.textContent = `KV kept: ${kept} of ${full} (${percent.toFixed(1)}%)`;
    this.kvFill.style.width = `${Math.min(percent, 100)}%`;
    this.kvBar.setAttribute("aria-label", `KV kept ${percent.toFixed(1)}% of a full cache`);
  }

  renderFigures() {
    const kv = this.kv || {};
    const rows = [
      ["TTFT", this.ttftMs === null ? null : `${Math.round(this.ttftMs)} ms`],
      ["Decode", this.decodeRate === null ? null : `${this.decodeRate.toFixed(1)} tok/s`],
      ["Tokens seen / kept", kv.tokens_seen == null ? null : `${kv.tokens_seen} / ${kv.tokens_kept}`],
      ["Prompt / answer tokens", this.usage ? `${this.usage.prompt_tokens} / ${this.usage.completion_tokens}` : null],
      ["Attention density", kv.attention_density == null ? undefined : `${(100 * kv.attention_density).toFixed(1)}%`],
      ["Tokens retained", kv.tokens_retained == null ? undefined : String(kv.tokens_retained)],
      ["Cached tokens", this.cachedTokens == null ? undefined : String(this.cachedTokens)],
    ];
    const items = rows
      .filter(([, value]) => value !== undefined) // policy figures appear only when the policy reports them
      .flatMap(([name, value]) => [element("dt", "", name), element("dd", "", value ?? "—")]);
    this.figures.replaceChildren(...items);
  }

  /** This column as exported: what was asked, what came back, what the client measured. */
  record() {
    return {
      preset: this.lane.preset,
      overrides: this.lane.overrides,
      status: this.state,
      answer: this.text,
      ttft_ms: this.ttftMs === null ? null : Math.round(this.ttftMs * 10) / 10,
      decode_tokens_per_s: this.decodeRate,
      usage: this.usage,
      kv: this.kv,
      error: this.error,
    };
  }
}
