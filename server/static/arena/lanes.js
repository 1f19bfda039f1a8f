// The preset editors: one row per column to run (a preset from GET /v1/policies and its overrides
// as a JSON object), two to six rows. Overrides are parsed here; their values are the server's to judge.

export const MIN_LANES = 2;
export const MAX_LANES = 6;

function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

/** Parse one overrides text: {overrides} or {error} (a sentence for the field). */
export function parseOverrides(text) {
  if (!text.trim()) return { overrides: {} };
  let value;
  try {
    value = JSON.parse(text);
  } catch (error) {
    return { error: `Overrides are not valid JSON: ${error.message}` };
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    return { error: 'Overrides must be a JSON object, e.g. {"window": 256}.' };
  }
  if ("preset" in value) return { error: "Choose the preset in the list, not in the overrides." };
  return { overrides: value };
}

/** An example override for a preset: its first parameter at the preset's value. */
export function overridesExample(preset) {
  const entries = Object.entries((preset && preset.params) || {});
  return entries.length ? JSON.stringify(Object.fromEntries(entries.slice(0, 1))) : "(this preset has no parameters)";
}

export class LaneEditors {
  constructor(list, addButton) {
    this.list = list;
    this.addButton = addButton;
    this.presets = [];
    this.rows = [];
    this.counter = 0;
    addButton.addEventListener("click", () => {
      const row = this.add(this.nextPreset());
      row.select.focus();
    });
  }

  /** Fill the preset lists; the first time, start with the default and a second preset. */
  setPresets(presets, defaultName) {
    this.presets = presets;
    for (const row of this.rows) {
      this.fillSelect(row.select, row.select.value);
      this.showExample(row);
    }
    if (this.rows.length === 0 && presets.length) {
      const second = presets.find((p) => p.name === "streaming_llm" && p.name !== defaultName) ||
        presets.find((p) => p.name !== defaultName);
      this.add(defaultName);
      this.add(second ? second.name : defaultName);
    }
    this.refreshButtons();
  }

  nextPreset() {
    const used = new Set(this.rows.map((row) => row.select.value));
    const unused = this.presets.find((p) => !used.has(p.name));
    return (unused || this.presets[0] || { name: "" }).name;
  }

  fillSelect(select, chosen) {
    select.replaceChildren(
      ...this.presets.map((p) => {
        const text = p.name === p.policy ? p.name : `${p.name} (${p.policy})`;
        return element("option", { value: p.name, textContent: text, title: p.description || "" });
      }),
    );
    if (chosen && this.presets.some((p) => p.name === chosen)) select.value = chosen;
  }

  add(presetName, overridesText = "") {
    const id = `lane-${++this.counter}`;
    const select = element("select", { id: `${id}-preset`, className: "lane-preset" });
    this.fillSelect(select, presetName);
    const overrides = element("textarea", {
      id: `${id}-overrides`,
      className: "lane-overrides",
      rows: 2,
      spellcheck: false,
      value: overridesText,
    });
    const error = element("p", { id: `${id}-error`, className: "field-error", hidden: true });
    overrides.setAttribute("aria-describedby", error.id);
    const remove = element("button", { type: "button", className: "lane-remove", textContent: "Remove" });
    const item = element("li", { className: "lane-editor" }, [
      element("div", { className: "field" }, [element("label", { htmlFor: select.id, textContent: "Preset" }), select]),
      element("div", { className: "field" }, [
        element("label", { htmlFor: overrides.id, textContent: "Overrides (JSON)" }),
        overrides,
        error,
      ]),
      remove,
    ]);
    const row = { item, select, overrides, error, remove };
    remove.setAttribute("aria-label", "Remove this preset");
    remove.addEventListener("click", () => this.remove(row));
    select.addEventListener("change", () => this.showExample(row));
    this.showExample(row);
    overrides.addEventListener("input", () => this.showError(row, null));
    this.rows.push(row);
    this.list.append(item);
    this.refreshButtons();
    return row;
  }

  remove(row) {
    if (this.rows.length <= MIN_LANES) return;
    this.rows = this.rows.filter((r) => r !== row);
    row.item.remove();
    this.refreshButtons();
    this.addButton.focus();
  }

  refreshButtons() {
    this.addButton.disabled = this.rows.length >= MAX_LANES || this.presets.length === 0;
    for (const row of this.rows) row.remove.disabled = this.rows.length <= MIN_LANES;
  }

  showExample(row) {
    row.overrides.placeholder = overridesExample(this.presets.find((p) => p.name === row.select.value));
  }

  showError(row, message) {
    row.error.textContent = message || "";
    row.error.hidden = !message;
    row.overrides.setAttribute("aria-invalid", message ? "true" : "false");
  }

  /** The lanes to run, or null after marking every invalid overrides field (focus on the first). */
  lanes() {
    let firstBad = null;
    const lanes = this.rows.map((row) => {
      const parsed = parseOverrides(row.overrides.value);
      this.showError(row, parsed.error);
      if (parsed.error && !firstBad) firstBad = row.overrides;
      return { preset: row.select.value, overrides: parsed.overrides || {} };
    });
    if (firstBad) {
      firstBad.focus();
      return null;
    }
    return lanes;
  }
}
