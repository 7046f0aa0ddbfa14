// The live panel: polls the server's Prometheus /metrics once a second and draws tokens/s over the
// last three minutes (or since the page opened, at least 30 s), with the running and waiting requests,
// KV blocks used and the prefix-cache hit rate.

const WINDOW_SECONDS = 180;
const MIN_WINDOW_SECONDS = 30;
const POLL_MS = 1000;
const BUSY_POLL_MS = 250; // while this page waits for an answer: its own tokens show as they stream

// Prometheus text exposition -> {metric name: sum over its label sets}.
export function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const match = /^([A-Za-z_:][\w:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const value = Number(match[3]);
    if (Number.isFinite(value)) values[match[1]] = (values[match[1]] || 0) + value;
  }
  return values;
}

function formatRate(rate) {
  return rate >= 100 ? rate.toFixed(0) : rate.toFixed(1);
}

export class LivePanel {
  constructor(api, elements) {
    this.api = api;
    this.el = elements;
    this.samples = []; // {t: seconds, rate: tokens/s}
    this.last = null;  // {t, tokens}
    this.timer = null;
    this.started = false;
    this.busy = false;
    new ResizeObserver(() => this.draw()).observe(this.el.canvas);
  }

  start() {
    if (this.started) return;
    this.started = true;
    this.seed().finally(() => this.tick());
  }

  // While this page waits for an answer it polls faster, and once more as soon as the answer ends.
  setBusy(busy) {
    if (busy === this.busy) return;
    this.busy = busy;
    if (this.timer !== null) this.schedule(busy ? BUSY_POLL_MS : 0);
  }

  schedule(delay) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.tick(), delay);
  }

  async tick() {
    this.timer = null;
    await this.poll();
    this.schedule(this.busy ? BUSY_POLL_MS : POLL_MS);
  }

  // The server's last minutes (GET /playground/history: [seconds ago, tokens so far] pairs), so that the
  // plot starts full on a server that has been busy.
  async seed() {
    let points;
    try {
      points = (await this.api.json("GET", "/playground/history")).generation_tokens;
    } catch (_) {
      return; // the plot starts empty; /metrics polling reports what is wrong
    }
    const now = performance.now() / 1000;
    for (let i = 1; i < points.length; i++) {
      const [agoBefore, before] = points[i - 1], [ago, tokens] = points[i];
      if (agoBefore > ago && ago <= WINDOW_SECONDS) {
        this.samples.push({ t: now - ago, rate: Math.max(0, tokens - before) / (agoBefore - ago) });
      }
    }
    if (points.length) this.last = { t: now - points[points.length - 1][0], tokens: points[points.length - 1][1] };
  }

  async poll() {
    if (document.hidden) return;
    let values;
    try {
      const response = await this.api.call("GET", "/metrics");
      values = parseMetrics(await response.text());
    } catch (error) {
      this.el.error.textContent = `metrics unavailable: ${error.message}`;
      this.el.error.hidden = false;
      this.el.dot.classList.remove("on");
      return;
    }
    this.el.error.hidden = true;
    this.el.dot.classList.add("on");
    this.update(values, performance.now() / 1000);
  }

  update(values, now) {
    const tokens = values.nemolite_engine_generation_tokens_total || 0;
    if (this.last !== null && now > this.last.t) {
      const rate = Math.max(0, tokens - this.last.tokens) / (now - this.last.t);
      this.samples.push({ t: now, rate });
      while (this.samples.length && this.samples[0].t < now - WINDOW_SECONDS) this.samples.shift();
      this.el.rateNow.textContent = formatRate(rate);
      const rates = this.samples.map((sample) => sample.rate);
      const mean = rates.reduce((sum, value) => sum + value, 0) / rates.length;
      this.el.rateSummary.textContent = `peak ${formatRate(Math.max(...rates))} · mean ${formatRate(mean)}`;
    }
    this.last = { t: now, tokens };
    const total = values.nemolite_kv_cache_blocks_total || 0;
    const used = values.nemolite_kv_cache_blocks_used || 0;
    this.el.running.textContent = String(values.nemolite_num_requests_running ?? "–");
    this.el.waiting.textContent = String(values.nemolite_num_requests_waiting ?? "–");
    this.el.kv.textContent = total ? `${used} / ${total}` : "–";
    this.el.kvMeter.style.width = total ? `${(100 * used / total).toFixed(1)}%` : "0";
    const hits = values.nemolite_prefix_cache_hit_rate;
    this.el.prefix.textContent = hits === undefined ? "–" : `${(100 * hits).toFixed(0)}%`;
    this.draw(now);
  }

  draw(now = performance.now() / 1000) {
    const canvas = this.el.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);
    const style = getComputedStyle(canvas);
    const accent = style.getPropertyValue("--accent").trim() || "#76b900";
    const grid = style.getPropertyValue("--grid").trim() || "rgba(128,128,128,.25)";
    const ink = style.getPropertyValue("--muted").trim() || "#888";
    const peak = Math.max(10, ...this.samples.map((s) => s.rate));
    const top = niceCeiling(peak);
    const pad = 4;
    const span = this.samples.length
      ? Math.min(WINDOW_SECONDS, Math.max(MIN_WINDOW_SECONDS, Math.ceil(now - this.samples[0].t))) : MIN_WINDOW_SECONDS;
    this.el.axisStart.textContent = span >= 120 ? `−${(span / 60).toFixed(0)} min` : `−${span} s`;
    const y = (rate) => height - pad - (height - 2 * pad) * (rate / top);
    const x = (t) => width * (1 - (now - t) / span);

    context.strokeStyle = grid;
    context.lineWidth = 1;
    context.font = "10px system-ui, sans-serif";
    context.fillStyle = ink;
    for (const fraction of [0, 0.5, 1]) {
      const level = y(top * fraction);
      context.beginPath();
      context.moveTo(0, Math.round(level) + 0.5);
      context.lineTo(width, Math.round(level) + 0.5);
      context.stroke();
      if (fraction > 0) context.fillText(String(top * fraction), 2, level + 11);
    }
    if (this.samples.length < 2) return;
    context.beginPath();
    this.samples.forEach((s, i) => (i ? context.lineTo(x(s.t), y(s.rate)) : context.moveTo(x(s.t), y(s.rate))));
    context.strokeStyle = accent;
    context.lineWidth = 2;
    context.lineJoin = "round";
    context.stroke();
    context.lineTo(x(this.samples[this.samples.length - 1].t), height);
    context.lineTo(x(this.samples[0].t), height);
    context.closePath();
    context.globalAlpha = 0.18;
    context.fillStyle = accent;
    context.fill();
    context.globalAlpha = 1;
  }
}

// A round plot ceiling: the smallest of 1, 1.5, 2, 3, 4, 5, 6, 8 x 10^k at or above value.
function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 1.5, 2, 3, 4, 5, 6, 8]) if (step * power >= value) return step * power;
  return 10 * power;
}
