// Model text into the page: only ever as text nodes (never HTML), optionally one span per token
// coloured by its probability.

// Colour of a token with probability p: red (unlikely) through amber to green (certain).
export function probabilityColour(logprob) {
  const p = Math.exp(Math.max(-50, logprob));
  const hue = Math.round(120 * p);
  return `hsla(${hue}, 85%, 50%, ${(0.18 + 0.22 * (1 - p)).toFixed(2)})`;
}

export function appendText(container, text) {
  const last = container.lastChild;
  if (last && last.nodeType === Node.TEXT_NODE) last.appendData(text);
  else container.appendChild(document.createTextNode(text));
}

function percent(logprob) {
  return `${(100 * Math.exp(logprob)).toFixed(1)}%`;
}

// ``alternatives``: the most likely tokens at that position ([{token, logprob}], OpenAI's top_logprobs),
// shown with the token's own probability when the pointer rests on it.
export function appendToken(container, text, logprob, alternatives = []) {
  if (logprob === null || logprob === undefined || !Number.isFinite(logprob)) {
    appendText(container, text);
    return;
  }
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = text;
  span.style.backgroundColor = probabilityColour(logprob);
  span.title = `logprob ${logprob.toFixed(3)} · p ${percent(logprob)}`;
  if (alternatives.length) {
    span.title += `\nmost likely: ${alternatives.map((a) => `${JSON.stringify(a.token)} ${percent(a.logprob)}`).join(", ")}`;
  }
  container.appendChild(span);
}

// "12 tokens · first token 40 ms · 95.3 tokens/s"; rate over the tokens after the first.
export function answerStats({ tokens, started, first, ended, note }) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (first !== null && first !== undefined) parts.push(`first token ${Math.round(first - started)} ms`);
  const span = (ended - (first ?? started)) / 1000;
  const counted = first !== null && first !== undefined ? tokens - 1 : tokens;
  if (counted > 0 && span > 0) parts.push(`${(counted / span).toFixed(1)} tokens/s`);
  else parts.push(`${((ended - started) / 1000).toFixed(2)} s`);
  if (note) parts.push(note);
  return parts.join(" · ");
}
