// The live stream: one EventSource per tab, re-opened with ?device=ID on a device page.
// Pages subscribe to event names; the top bar shows whether the stream is connected.

const EVENTS = ["hello", "stats", "status", "resync", "seen", "rollout", "failure", "bundles", "device", "logout", "error"];

class Live {
  constructor() {
    this.source = null;
    this.device = null;
    this.handlers = new Map();
    this.state = "closed";
    this.stateListeners = new Set();
  }

  on(name, fn) {
    if (!this.handlers.has(name)) this.handlers.set(name, new Set());
    this.handlers.get(name).add(fn);
    return () => this.handlers.get(name).delete(fn);
  }

  onState(fn) {
    this.stateListeners.add(fn);
    fn(this.state);
    return () => this.stateListeners.delete(fn);
  }

  setState(state) {
    this.state = state;
    for (const fn of this.stateListeners) fn(state);
  }

  emit(name, data) {
    for (const fn of this.handlers.get(name) || []) {
      try { fn(data); } catch (exc) { console.error("live handler failed", name, exc); }
    }
  }

  /** Connect, watching one device (or none); reconnects only when that changes. */
  watch(device = null) {
    if (this.source && this.device === device) return;
    this.close();
    this.device = device;
    const url = "/dashboard/events" + (device ? `?device=${encodeURIComponent(device)}` : "");
    const source = new EventSource(url);
    this.source = source;
    this.setState("connecting");
    source.onopen = () => this.setState("live");
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED) { this.setState("connecting"); return; }
      if (this.source === source) this.source = null; // refused (e.g. 401): the app decides what next
      this.setState("failed");
    };
    for (const name of EVENTS) {
      source.addEventListener(name, (e) => {
        let data = {};
        try { data = JSON.parse(e.data); } catch { /* comments and empty data */ }
        if (name === "hello") this.setState("live");
        if (name === "logout") this.close();
        this.emit(name, data);
      });
    }
  }

  close() {
    if (this.source) this.source.close();
    this.source = null;
    this.setState("closed");
  }
}

export const live = new Live();
