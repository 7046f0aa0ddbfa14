// The playground page: chat (OpenAI streaming), completion (NeMo PUT /generate, shown as curl) and, on a
// reward model, two answers scored side by side. Model text only ever enters the page as text nodes.

import { Api, curlLine } from "./api.js";
import { LivePanel } from "./live.js";
import { answerStats, appendText, appendToken } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const api = new Api();
const page = {
  mode: "chat",
  config: null,
  messages: [],      // the chat so far, as sent to /v1/chat/completions
  chatModel: null,   // the model the chat was with (a reload onto another model starts a new one)
  savedSettings: {}, // the settings restored from the last visit
  controller: null,  // the running request's AbortController
};

// ---- messages to the user ----------------------------------------------------------------------------

function showError(message) {
  $("banner-text").textContent = message;
  $("banner").hidden = false;
}

function clearError() {
  $("banner").hidden = true;
}

// ---- the API key -------------------------------------------------------------------------------------

let keyRequest = null;

function askKey(refused = false) {
  if (keyRequest) return keyRequest;
  $("key-refused").hidden = !refused;
  const dialog = $("key-dialog");
  keyRequest = new Promise((resolve) => {
    const done = (given) => {
      $("key-form").removeEventListener("submit", submit);
      $("key-cancel").removeEventListener("click", cancel);
      dialog.close();
      keyRequest = null;
      $("key-button").hidden = !api.key;
      resolve(given);
    };
    const submit = (event) => {
      event.preventDefault();
      api.setKey($("key-input").value.trim());
      done(Boolean(api.key));
    };
    const cancel = () => done(false);
    $("key-form").addEventListener("submit", submit);
    $("key-cancel").addEventListener("click", cancel);
    $("key-input").value = "";
    dialog.showModal();
    $("key-input").focus();
  });
  return keyRequest;
}

api.onUnauthorized = askKey;

// ---- the transcript ----------------------------------------------------------------------------------

// A new element with a class, text (as a text node) or children.
function element(tag, className, text = null, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = text;
  node.append(...children);
  return node;
}

function addEntry(kind, label) {
  $("empty-hint").hidden = true;
  const body = element("div", "body"), meta = element("div", "meta");
  const entry = element("article", `entry ${kind}`, null, element("div", "who", label), body, meta);
  $("log").appendChild(entry);
  scrollDown();
  return { entry, body, meta };
}

function scrollDown() {
  const log = $("log");
  if (log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
}

function failEntry(parts, error) {
  parts.entry.classList.add("failed");
  parts.entry.appendChild(element("div", "error-text", error.message));
  showError(error.message);
}

// ---- what survives a reload: the settings, the mode and the chat (per model), in localStorage ----------

const STORE = "nemolite-playground";

function stored() {
  try {
    return JSON.parse(localStorage.getItem(STORE)) || {};
  } catch (_) {
    return {};
  }
}

function saveState() {
  const settings = {};
  for (const input of document.querySelectorAll(".side input, .side textarea")) {
    settings[input.id] = input.type === "checkbox" ? input.checked : input.value;
  }
  const state = { settings, mode: page.mode, chat: { model: page.chatModel, messages: page.messages } };
  try {
    localStorage.setItem(STORE, JSON.stringify(state));
  } catch (_) { /* storage full or off: nothing is kept */ }
}

function restoreState() {
  const state = stored();
  for (const [id, value] of Object.entries(state.settings || {})) {
    const input = document.getElementById(id);
    if (!input || !input.closest(".side")) continue;
    if (input.type === "checkbox") input.checked = value === true;
    else if (typeof value === "string") input.value = value;
  }
  page.savedSettings = state.settings || {};
  const chat = state.chat || {};
  if (Array.isArray(chat.messages)) {
    page.chatModel = chat.model;
    for (const message of chat.messages) {
      if (!message || typeof message.content !== "string" || !["user", "assistant"].includes(message.role)) continue;
      page.messages.push({ role: message.role, content: message.content });
      const parts = message.role === "user" ? addEntry("user", "You") : addEntry("assistant", "Assistant");
      appendText(parts.body, message.content);
    }
  }
  return state.mode === "completion" ? "completion" : "chat";
}

function clearChat() {
  page.messages = [];
  for (const entry of $("log").querySelectorAll(".entry")) entry.remove();
  $("empty-hint").hidden = false;
}

function setRunning(controller) {
  if (controller === null) saveState();
  page.controller = controller;
  $("send").disabled = controller !== null;
  $("stop").disabled = controller === null;
  $("regenerate").disabled = controller !== null || page.mode !== "chat" || page.messages.length === 0;
  live.setBusy(controller !== null);
}

// ---- settings ----------------------------------------------------------------------------------------

function number(id) {
  const value = Number($(id).value);
  if ($(id).value.trim() === "" || !Number.isFinite(value)) {
    const label = $(id).closest("label");
    throw new Error(`${label ? label.firstChild.textContent.trim() : id} must be a number`);
  }
  return value;
}

function schema() {
  const text = $("schema").value.trim();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`the JSON schema is not valid JSON: ${error.message}`);
  }
}

function adapter() {
  return $("adapter").value || null;
}

function chatBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...page.messages);
  const body = {
    model: adapter() || page.config?.model, messages, stream: true, stream_options: { include_usage: true },
    max_tokens: number("chat-max-tokens"), temperature: number("chat-temperature"), top_p: number("chat-top-p"),
  };
  const topK = number("chat-top-k");
  if (topK > 0) body.top_k = topK;
  if ($("chat-logprobs").checked) Object.assign(body, { logprobs: true, top_logprobs: 5 });
  const json = schema();
  if (json !== null) body.response_format = { type: "json_schema", json_schema: { name: "playground", schema: json } };
  return body;
}

// Comma-separated, or a JSON array of strings for end strings that hold commas.
function endStrings() {
  const text = $("nemo-end-strings").value.trim();
  if (!text.startsWith("[")) return text.split(",").map((s) => s.trim()).filter(Boolean);
  let strings;
  try {
    strings = JSON.parse(text);
  } catch (error) {
    throw new Error(`end strings: not a JSON array (${error.message})`);
  }
  if (!Array.isArray(strings) || !strings.every((s) => typeof s === "string")) {
    throw new Error("end strings: give a JSON array of strings, or strings separated by commas");
  }
  return strings;
}

function nemoBody(prompt) {
  const body = {
    sentences: [prompt], tokens_to_generate: number("nemo-tokens"), temperature: number("nemo-temperature"),
    add_BOS: $("nemo-add-bos").checked, top_k: number("nemo-top-k"), top_p: number("nemo-top-p"),
    greedy: $("nemo-greedy").checked, repetition_penalty: number("nemo-repetition"),
    min_tokens_to_generate: number("nemo-min-tokens"),
    end_strings: endStrings(),
    compute_logprob: $("nemo-logprob").checked,
  };
  if (adapter()) body.adapter_id = adapter();
  const json = schema();
  if (json !== null) body.json_schema = json;
  return body;
}

function updateCurl() {
  if (page.mode !== "completion") return;
  let text;
  try {
    text = curlLine("PUT", `${location.origin}/generate`, nemoBody($("prompt").value), Boolean(api.key));
  } catch (error) {
    text = `# ${error.message}`;
  }
  $("curl").textContent = text;
}

// ---- chat --------------------------------------------------------------------------------------------

async function sendChat(text) {
  if (text !== null) {
    page.messages.push({ role: "user", content: text });
    appendText(addEntry("user", "You").body, text);
  }
  const body = chatBody();
  const parts = addEntry("assistant", adapter() || "Assistant");
  parts.entry.classList.add("streaming");
  const controller = new AbortController();
  setRunning(controller);
  const started = performance.now();
  let first = null, counted = 0, usage = null, finish = null, answer = "";
  try {
    for await (const event of api.events("/v1/chat/completions", body, controller.signal)) {
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const content = choice.delta && choice.delta.content;
      if (content) {
        first ??= performance.now();
        const logprobs = choice.logprobs && choice.logprobs.content;
        counted += logprobs && logprobs.length ? logprobs.length : 1;
        if (logprobs && logprobs.length) {
          appendToken(parts.body, content, Math.min(...logprobs.map((l) => l.logprob)), logprobs[0].top_logprobs || []);
        }
        else appendText(parts.body, content);
        answer += content;
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    page.messages.push({ role: "assistant", content: answer });
    const note = finish === "length" ? "stopped at max tokens" : "";
    parts.meta.textContent = answerStats({ tokens: usage ? usage.completion_tokens : counted, started, first,
                                           ended: performance.now(), note });
  } catch (error) {
    if (error.name !== "AbortError") {
      failEntry(parts, error);
    } else if (parts.entry.isConnected) { // stopped (not cleared away): the partial answer stays in the chat
      page.messages.push({ role: "assistant", content: answer });
      parts.meta.textContent = answerStats({ tokens: counted, started, first, ended: performance.now(),
                                             note: "stopped" });
    }
  } finally {
    parts.entry.classList.remove("streaming");
    setRunning(null);
  }
}

function regenerate() {
  if (page.controller || page.mode !== "chat") return;
  const last = page.messages[page.messages.length - 1];
  if (!last) return;
  if (last.role === "assistant") page.messages.pop();
  const entries = $("log").querySelectorAll(".entry");
  const lastEntry = entries[entries.length - 1];
  if (lastEntry && lastEntry.classList.contains("assistant")) lastEntry.remove();
  clearError();
  sendChat(null);
}

// ---- completion (NeMo PUT /generate) -----------------------------------------------------------------

async function sendCompletion(prompt) {
  const body = nemoBody(prompt);
  appendText(addEntry("user", "Prompt").body, prompt);
  const parts = addEntry("assistant", "Completion");
  parts.entry.classList.add("streaming");
  const controller = new AbortController();
  setRunning(controller);
  const started = performance.now();
  try {
    const answer = await api.json("PUT", "/generate", body, controller.signal);
    const sentence = answer.sentences[0], offsets = answer.offsets[0];
    const logprobs = answer.logprob ? answer.logprob[0] : null;
    let tokens = 0;
    for (let i = 0; i < offsets.length; i++) {
      if (offsets[i] < prompt.length) continue;
      tokens++;
      const piece = sentence.slice(offsets[i], i + 1 < offsets.length ? offsets[i + 1] : sentence.length);
      appendToken(parts.body, piece, logprobs && i > 0 ? logprobs[i - 1] : null);
    }
    if (tokens === 0) appendText(parts.body, sentence.slice(prompt.length));
    parts.meta.textContent = answerStats({ tokens, started, first: null, ended: performance.now(),
                                           note: "PUT /generate answers whole (no time to first token)" });
  } catch (error) {
    if (error.name === "AbortError") parts.meta.textContent = "stopped";
    else failEntry(parts, error);
  } finally {
    parts.entry.classList.remove("streaming");
    setRunning(null);
  }
}

// ---- reward model ------------------------------------------------------------------------------------

function scoreCard(label, result, range, winner) {
  const card = element("section", winner ? "score-card winner" : "score-card");
  const score = element("span", "score", result.score.toFixed(2));
  score.title = "weighted score";
  card.appendChild(element("div", "score-head", null, element("span", "", label), score));
  for (const [attribute, value] of Object.entries(result.attributes)) {
    const fill = element("div", "");
    fill.style.width = `${(100 * (value - range[0]) / (range[1] - range[0])).toFixed(1)}%`;
    card.appendChild(element("div", "bar-row", null, element("span", "", attribute), element("div", "bar", null, fill),
                             element("span", "num", value.toFixed(2))));
  }
  return card;
}

async function sendReward(prompt) {
  const answers = [$("answer-a").value.trim(), $("answer-b").value.trim()];
  if (!answers[0] || !answers[1]) throw new Error("write both answers (A and B) to score them");
  const conversations = answers.map((answer) => [{ role: "user", content: prompt },
                                                 { role: "assistant", content: answer }]);
  appendText(addEntry("user", "Prompt").body, prompt);
  const parts = addEntry("assistant", "Scores");
  const controller = new AbortController();
  setRunning(controller);
  const started = performance.now();
  try {
    const body = { conversations };
    if (adapter()) body.model = adapter();
    const result = await api.json("POST", "/v1/reward", body, controller.signal);
    const [a, b] = result.data;
    const values = [...Object.values(a.attributes), ...Object.values(b.attributes)];
    const range = [Math.min(0, ...values), Math.max(4, ...values)];
    parts.body.appendChild(element("div", "scores", null, scoreCard("Answer A", a, range, a.score >= b.score),
                                   scoreCard("Answer B", b, range, b.score > a.score)));
    parts.meta.textContent = `scored in ${Math.round(performance.now() - started)} ms`;
  } catch (error) {
    if (error.name === "AbortError") parts.meta.textContent = "stopped";
    else failEntry(parts, error);
  } finally {
    setRunning(null);
  }
}

// ---- wiring ------------------------------------------------------------------------------------------

async function send() {
  if (page.controller) return;
  const prompt = $("prompt").value;
  if (!prompt.trim()) return;
  clearError();
  try {
    if (page.mode === "chat") {
      chatBody(); // check the settings before the prompt leaves the box
      $("prompt").value = "";
      await sendChat(prompt);
    } else if (page.mode === "completion") {
      await sendCompletion(prompt); // builds (and so checks) the body before it changes the page
    } else {
      await sendReward(prompt);
    }
  } catch (error) {
    showError(error.message);
  }
}

function setMode(mode) {
  page.mode = mode;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
    tab.tabIndex = tab.dataset.mode === mode ? 0 : -1;
  }
  for (const section of document.querySelectorAll("[data-modes]")) {
    section.hidden = !section.dataset.modes.split(" ").includes(mode);
  }
  $("curl-box").hidden = mode !== "completion";
  $("reward-answers").hidden = mode !== "reward";
  $("regenerate").hidden = mode !== "chat";
  $("mode-hint").textContent = {
    chat: "OpenAI /v1/chat/completions, streamed",
    completion: "NeMo PUT /generate",
    reward: "POST /v1/reward",
  }[mode];
  $("prompt").placeholder = mode === "reward" ? "The user's message both answers reply to…"
    : mode === "completion" ? "Text for the model to continue…" : "Ask the model something…";
  setRunning(page.controller);
  updateCurl();
}

async function loadAdapters() {
  if (!page.config || !page.config.lora) return;
  try {
    const models = await api.json("GET", "/v1/models");
    const chosen = $("adapter").value;
    const select = $("adapter");
    select.replaceChildren(new Option("base model", ""));
    for (const card of models.data) if (card.parent) select.appendChild(new Option(card.id, card.id));
    select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
    $("adapter-field").hidden = false;
  } catch (error) {
    showError(`could not list the adapters: ${error.message}`);
  }
}

async function loadConfig() {
  try {
    page.config = await api.json("GET", "/playground/config");
  } catch (error) {
    $("model-name").textContent = "not connected";
    showError(`${error.message} (retrying)`);
    setTimeout(loadConfig, 3000);
    return;
  }
  clearError();
  const config = page.config;
  $("model-name").textContent = config.model;
  document.title = `${config.model} · nemolite playground`;
  $("key-button").hidden = !api.key;
  if (page.savedSettings["nemo-add-bos"] === undefined) $("nemo-add-bos").checked = config.add_bos !== false;
  if (page.chatModel !== config.model) {
    if (page.chatModel !== null && page.chatModel !== undefined) clearChat();
    page.chatModel = config.model;
    saveState();
  }
  if (config.reward) {
    $("tab-chat").hidden = $("tab-completion").hidden = true;
    $("tab-reward").hidden = false;
    $("reward-weights").replaceChildren(...config.reward_attributes.map(
      (name, i) => element("li", "", `${name} ${config.reward_weights[i]}`)));
    setMode("reward");
  } else if (!config.chat) {
    $("tab-chat").hidden = true;
    setMode("completion");
  }
  await loadAdapters();
  live.start();
}

const live = new LivePanel(api, {
  canvas: $("rate-plot"), rateNow: $("rate-now"), rateSummary: $("rate-summary"), axisStart: $("axis-start"),
  running: $("stat-running"), waiting: $("stat-waiting"),
  kv: $("stat-kv"), kvMeter: $("kv-meter"), prefix: $("stat-prefix"), error: $("live-error"), dot: $("live-dot"),
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  } else if (event.key === "Escape" && page.controller) {
    page.controller.abort();
  }
});
$("stop").addEventListener("click", () => page.controller && page.controller.abort());
$("regenerate").addEventListener("click", regenerate);
$("clear").addEventListener("click", () => {
  if (page.controller) page.controller.abort();
  clearChat();
  clearError();
  setRunning(null);
});
$("banner-close").addEventListener("click", clearError);
$("key-button").addEventListener("click", () => askKey(false).then(loadConfig));
$("adapter").addEventListener("focus", loadAdapters);
$("copy-curl").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("curl").textContent);
    $("copy-curl").textContent = "Copied";
  } catch (_) {
    getSelection().selectAllChildren($("curl")); // no clipboard (plain http off localhost): select it instead
    $("copy-curl").textContent = "Selected";
  }
  setTimeout(() => { $("copy-curl").textContent = "Copy"; }, 1500);
});
for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => setMode(tab.dataset.mode));
}
$("tabs").addEventListener("keydown", (event) => { // arrows move between the tabs (WAI-ARIA tabs pattern)
  if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
  const tabs = [...document.querySelectorAll("[role=tab]")].filter((tab) => !tab.hidden);
  const at = tabs.findIndex((tab) => tab.dataset.mode === page.mode);
  const next = tabs[(at + (event.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length];
  setMode(next.dataset.mode);
  next.focus();
});
document.querySelector(".side").addEventListener("input", () => {
  updateCurl();
  saveState();
});
$("prompt").addEventListener("input", updateCurl);

setMode(restoreState());
loadConfig();
