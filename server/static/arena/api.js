// The public kvmux API as the arena uses it: the API key (kept in sessionStorage), JSON GETs, and
// streamed chat completions read from the SSE body with fetch + ReadableStream.

const KEY_STORAGE = "kvmux.arena.apiKey";

export function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function storeKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage refused (private mode): the key still works for this page
  }
}

/** A failed call as the page shows it; `kind` says which message and which action fit. */
export class ApiError extends Error {
  constructor(status, message, { retryAfter = null, param = null } = {}) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
    this.param = param;
  }

  get kind() {
    if (this.status === 401) return "auth";
    if (this.status === 429 || this.status === 503) return "busy";
    if (this.status >= 400 && this.status < 500) return "bad_request";
    if (this.status === 0) return "network";
    return "server";
  }
}

export function isAbort(error) {
  return error && error.name === "AbortError";
}

function headers(key, json) {
  const out = {};
  if (key) out.Authorization = `Bearer ${key}`;
  if (json) out["Content-Type"] = "application/json";
  return out;
}

async function errorFrom(response) {
  let message = `HTTP ${response.status} ${response.statusText}`.trim();
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param ?? null;
    }
  } catch {
    // not an OpenAI-shaped body (a proxy's page): keep the status line
  }
  return new ApiError(response.status, message, { retryAfter: response.headers.get("Retry-After"), param });
}

async function send(path, options) {
  try {
    return await fetch(path, options);
  } catch (error) {
    if (isAbort(error)) throw error;
    throw new ApiError(0, `The server could not be reached (${error.message}).`);
  }
}

export async function getJSON(path, key) {
  const response = await send(path, { headers: headers(key, false) });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

/** The `data:` payloads of the complete SSE events in `buffer`, and the unfinished rest. */
export function splitEvents(buffer) {
  const events = buffer.split(/\r?\n\r?\n/);
  const rest = events.pop();
  const payloads = events
    .map((event) =>
      event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n"),
    )
    .filter((data) => data !== "");
  return { payloads, rest };
}

/**
 * POST a streamed chat completion and call `onChunk(chunk)` for every chunk until `[DONE]`.
 * Throws ApiError for an HTTP error or an error event in the stream, and the fetch's AbortError
 * when `signal` is aborted (the server then cancels the request).
 */
export async function streamChat(body, key, signal, onChunk) {
  const response = await send("/v1/chat/completions", {
    method: "POST",
    headers: headers(key, true),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError(0, "The stream ended before the server finished the answer.");
    const { payloads, rest } = splitEvents(buffer + value);
    buffer = rest;
    for (const data of payloads) {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        throw new ApiError(chunk.error.code || 500, chunk.error.message || "The server reported an error.", {
          param: chunk.error.param ?? null,
        });
      }
      onChunk(chunk);
    }
  }
}
