// The server's HTTP APIs as the page uses them: JSON calls and OpenAI-style server-sent events, with the
// API key (when the server has one) sent as a bearer token, and every failure turned into an ApiError
// whose message can be shown to the user as it is.

const KEY_STORAGE = "nemolite-api-key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status; // 0: no answer (the connection failed or was lost)
  }
}

// The message of an error body: OpenAI's {"error": {"message"}}, NeMo's and Triton's {"error": "..."}.
export function errorMessage(status, text) {
  try {
    const body = JSON.parse(text);
    const error = body && body.error;
    if (typeof error === "string") return error;
    if (error && typeof error.message === "string") return error.message;
    if (body && typeof body.detail === "string") return body.detail;
  } catch (_) { /* not JSON: fall through */ }
  return text.trim().slice(0, 500) || `the server answered HTTP ${status}`;
}

function connectionLost(error) {
  return new ApiError(0, `lost the connection to the server (${error.message || error}); is nemolite serve still running?`);
}

export class Api {
  constructor() {
    this.key = sessionStorage.getItem(KEY_STORAGE) || "";
    // Called on a 401 with whether a key was sent (and refused): resolves to true once the user gave a
    // key, false if they declined.
    this.onUnauthorized = async (refused) => false;
  }

  setKey(key) {
    this.key = key;
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  }

  headers(hasBody) {
    const headers = {};
    if (hasBody) headers["Content-Type"] = "application/json";
    if (this.key) headers["Authorization"] = `Bearer ${this.key}`;
    return headers;
  }

  // The Response of a successful call; a 4xx/5xx or a failed connection throws ApiError. A 401 asks for
  // the key and retries, until the server takes it or the user cancels.
  async call(method, path, body, signal) {
    let response;
    try {
      response = await fetch(path, {
        method, signal, headers: this.headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw connectionLost(error);
    }
    if (response.ok) return response;
    const text = await response.text().catch(() => "");
    if (response.status === 401 && await this.onUnauthorized(Boolean(this.key))) {
      return this.call(method, path, body, signal);
    }
    throw new ApiError(response.status, errorMessage(response.status, text));
  }

  async json(method, path, body, signal) {
    const response = await this.call(method, path, body, signal);
    return response.json();
  }

  // The JSON events of a streamed answer, until [DONE]; an error event throws ApiError.
  async *events(path, body, signal) {
    const response = await this.call("POST", path, body, signal);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (error) {
          if (error.name === "AbortError") throw error;
          throw connectionLost(error);
        }
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        const lines = buffer.split(/\r?\n/);
        buffer = lines.pop();
        for (const line of lines) {
          if (line.startsWith("data:")) {
            data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
            continue;
          }
          if (line !== "" || data.length === 0) continue;
          const text = data.join("\n");
          data = [];
          if (text === "[DONE]") return;
          const event = JSON.parse(text);
          if (event.error) throw new ApiError(500, errorMessage(500, text));
          yield event;
        }
      }
    } finally {
      reader.releaseLock();
    }
    throw new ApiError(0, "the answer ended before the server finished it (the connection closed early)");
  }
}

// A shell word: single-quoted, with ' written as '\''.
function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

// The curl command line of a JSON request; the key is written as $NEMOLITE_API_KEY, never in clear.
export function curlLine(method, url, body, withKey) {
  const parts = ["curl", "-X", method, shellQuote(url), "-H", shellQuote("Content-Type: application/json")];
  if (withKey) parts.push("-H", '"Authorization: Bearer $NEMOLITE_API_KEY"');
  parts.push("-d", shellQuote(JSON.stringify(body)));
  return parts.join(" ");
}
