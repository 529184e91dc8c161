// The run page: the graph with each step's state, a timeline of every attempt, each step's
// live log, the events, a slider that shows the run as of any event, and the operator's
// buttons (by the token's scope and the run's state, each asking for a reason).

import { call, stream, type Event, type Run, type Step, type Who } from "./api";
import { clear, h, seconds, short, svg, time } from "./dom";
import { layout, needsOf } from "./graph";
import { LogPane } from "./logs";
import { bars, type Bar } from "./timeline";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const LIVE = new Set(["running", "waiting", "retrying"]);
const NODE_W = 136, NODE_H = 44, COL_GAP = 36, ROW_GAP = 16;

export class RunPage {
  private run: Run | null = null;
  private shown: Run | null = null;  // the run as the slider shows it (now, or as of a seq)
  private events: Event[] = [];
  private at: number | null = null;  // the slider's seq; null: live
  private readonly panes = new Map<string, LogPane>();
  private selected: string | null = null;
  private refreshing: number | null = null;
  private readonly head = h("div", { class: "run-head" });
  private readonly actions = h("div", { class: "actions", role: "group", "aria-label": "Operator actions" });
  private readonly travel = h("div", { class: "travel" });
  private readonly graph = h("div", { class: "graph" });
  private readonly steps = h("div", { class: "steps" });
  private readonly timeline = h("div", { class: "timeline" });
  private readonly tabs = h("div", { class: "tabs", role: "tablist", "aria-label": "Step logs" });
  private readonly pane = h("div", { class: "pane-holder" });
  private readonly eventList = h("div", { class: "events" });
  private readonly notice = h("p", { class: "notice", role: "status", "aria-live": "polite" });
  private readonly dialog = h("dialog", { class: "reason" });
  private readonly slider = h("input", { type: "range", id: "travel-seq", min: 1, max: 1, value: 1 });
  private readonly sliderText = h("output", { for: "travel-seq", id: "travel-text" });

  constructor(readonly main: HTMLElement, readonly id: string, readonly who: Who) {}

  async open(): Promise<void> {
    const [run, events] = await Promise.all([
      call<Run>(`/api/v1/runs/${this.id}`),
      call<{ events: Event[] }>(`/api/v1/runs/${this.id}/events`),
    ]);
    this.run = run;
    this.shown = run;
    this.events = events.events;
    document.title = `run ${short(run.id, 8)} · ${run.state} · cistate`;
    const live = h("button", { type: "button", class: "live" }, "Back to now");
    live.addEventListener("click", () => { void this.travelTo(null); });
    this.slider.addEventListener("input", () => { void this.travelTo(Number(this.slider.value)); });
    this.travel.append(h("label", { for: "travel-seq" }, "Show the run as of event"),
                       this.slider, this.sliderText, live);
    clear(this.main,
      this.head, this.notice, this.actions, this.travel,
      h("section", { "aria-labelledby": "h-graph" }, h("h2", { id: "h-graph" }, "Pipeline"), this.graph, this.steps),
      h("section", { "aria-labelledby": "h-timeline" }, h("h2", { id: "h-timeline" }, "Timeline"), this.timeline),
      h("section", { "aria-labelledby": "h-logs" }, h("h2", { id: "h-logs" }, "Logs"), this.tabs, this.pane),
      h("section", { "aria-labelledby": "h-events" }, h("h2", { id: "h-events" }, "Events"), this.eventList),
      this.dialog);
    this.render();
    performance.mark("cistate:first-render");  // bench/ui.py's time to first render
    this.openFromHash();
    window.addEventListener("hashchange", () => this.openFromHash());
    // a live run's timeline grows with the clock, between events too
    setInterval(() => {
      if (this.at === null && this.run !== null && !TERMINAL.has(this.run.state)) {
        this.renderTimeline(this.events);
      }
    }, 1000);
    void this.follow();
  }

  // -- live

  private async follow(): Promise<void> {
    for (;;) {
      const abort = new AbortController();
      try {
        for await (const message of stream(`/api/v1/runs/${this.id}/stream`, abort.signal)) {
          if (message.event === "end") break;
          const event = JSON.parse(message.data) as Event;
          if (!this.events.some((e) => e.seq === event.seq)) {
            this.events.push(event);
            this.events.sort((a, b) => a.seq - b.seq);
          }
          this.scheduleRefresh();
        }
      } catch { /* dropped: pick it up again below */ }
      this.scheduleRefresh();
      // ended (or dropped): look again now and then, for a retry or a rerun
      for (;;) {
        await new Promise((resolve) => setTimeout(resolve, 2000));
        try {
          const run = await call<Run>(`/api/v1/runs/${this.id}`);
          if (!TERMINAL.has(run.state) || run.version > (this.run?.version ?? 0)) break;
        } catch { /* the service is away: try again */ }
      }
    }
  }

  private scheduleRefresh(): void {
    if (this.refreshing !== null) return;
    this.refreshing = window.setTimeout(() => { void this.refresh(); }, 100);
  }

  private async refresh(): Promise<void> {
    try {
      const run = await call<Run>(`/api/v1/runs/${this.id}`);
      if (this.events.length < run.version) {  // the stream missed some: read them all
        const all = await call<{ events: Event[] }>(`/api/v1/runs/${this.id}/events`);
        this.events = all.events;
      }
      this.run = run;
      if (this.at === null) this.shown = run;
      document.title = `run ${short(run.id, 8)} · ${run.state} · cistate`;
      this.render();
      this.reopenLogs();
    } finally {
      this.refreshing = null;
    }
  }

  // a log pane that ended is followed again when its step starts over (a retry)
  private reopenLogs(): void {
    for (const step of this.run?.steps ?? []) {
      const pane = this.panes.get(step.name);
      if (pane !== undefined && pane.ended && LIVE.has(step.state)
          && step.attempts !== pane.endedAttempts) {
        pane.endedAttempts = step.attempts;
        pane.start();
      }
    }
  }

  // -- time travel

  private async travelTo(seq: number | null): Promise<void> {
    if (this.run === null) return;
    if (seq !== null && seq >= this.run.version) seq = null;
    this.at = seq;
    this.shown = seq === null ? this.run : await call<Run>(`/api/v1/runs/${this.id}?at=${seq}`);
    if (this.at !== seq) return;  // the slider moved on meanwhile
    this.render();
  }

  private visibleEvents(): Event[] {
    return this.at === null ? this.events : this.events.filter((e) => e.seq <= (this.at ?? 0));
  }

  // -- drawing

  private render(): void {
    const run = this.shown;
    if (run === null || this.run === null) return;
    const events = this.visibleEvents();
    this.renderHead(run);
    this.renderActions();
    this.renderTravel();
    this.renderGraph(run, events);
    this.renderSteps(run);
    this.renderTimeline(events);
    this.renderTabs(run);
    this.renderEvents(events);
  }

  private renderHead(run: Run): void {
    const rows: [string, string | Node][] = [
      ["Repository", run.repo], ["Ref", run.ref], ["Commit", run.commit],
      ["Pipeline", run.pipeline], ["Created", time(run.created_at)], ["Updated", time(run.updated_at)],
    ];
    if (run.rerun_of) rows.push(["Rerun of", h("a", { href: `/runs/${encodeURIComponent(run.rerun_of)}` }, run.rerun_of)]);
    clear(this.head,
      h("h1", {}, "Run ", h("code", {}, short(run.id, 8)), " ",
        h("span", { class: `state s-${run.state}`, id: "run-state", "data-state": run.state }, run.state)),
      h("dl", { class: "meta" }, ...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
  }

  private renderTravel(): void {
    const version = this.run?.version ?? 1;
    this.slider.max = String(Math.max(1, version));
    this.slider.value = String(this.at ?? version);
    const seq = this.at ?? version;
    const event = this.events.find((e) => e.seq === seq);
    this.sliderText.textContent = `${this.at === null ? "now: " : "as of "}event ${seq} of ${version}`
      + (event ? ` (${event.type}, ${time(event.recorded_at)})` : "");
    this.travel.classList.toggle("past", this.at !== null);
    this.travel.dataset.at = String(seq);
  }

  private renderGraph(run: Run, events: Event[]): void {
    const steps = run.steps ?? [];
    const names = steps.map((s) => s.name);
    const nodes = layout(names, needsOf(events.length ? events : this.events, names));
    const byName = new Map(nodes.map((n) => [n.name, n]));
    const state = new Map(steps.map((s) => [s.name, s]));
    const columns = Math.max(1, ...nodes.map((n) => n.column + 1));
    const rows = Math.max(1, ...nodes.map((n) => n.row + 1));
    const width = columns * (NODE_W + COL_GAP) - COL_GAP + 8;
    const height = rows * (NODE_H + ROW_GAP) - ROW_GAP + 8;
    const x = (n: { column: number }): number => 4 + n.column * (NODE_W + COL_GAP);
    const y = (n: { row: number }): number => 4 + n.row * (NODE_H + ROW_GAP);
    const drawing = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                                 "aria-label": "The pipeline's steps and what each needs" });
    for (const node of nodes) {
      for (const need of node.needs) {
        const from = byName.get(need);
        if (from === undefined) continue;
        const x1 = x(from) + NODE_W, y1 = y(from) + NODE_H / 2, x2 = x(node), y2 = y(node) + NODE_H / 2;
        drawing.append(svg("path", { class: "edge",
          d: `M${x1},${y1} C${x1 + COL_GAP / 2},${y1} ${x2 - COL_GAP / 2},${y2} ${x2},${y2}` }));
      }
    }
    for (const node of nodes) {
      const step = state.get(node.name);
      const s = step?.state ?? "pending";
      const link = svg("a", { href: `#log-${node.name}`, class: `node s-${s}`, "data-step": node.name,
                              "data-state": s, "aria-label": `${node.name}: ${s}, attempt ${step?.attempts ?? 0}` },
        svg("rect", { x: x(node), y: y(node), width: NODE_W, height: NODE_H, rx: 6 }),
        svg("text", { x: x(node) + 10, y: y(node) + 18, class: "name" }, short(node.name, 16)),
        svg("text", { x: x(node) + 10, y: y(node) + 35, class: "sub" },
            `${s}${(step?.attempts ?? 0) > 1 ? ` · attempt ${step?.attempts}` : ""}`));
      drawing.append(link);
    }
    clear(this.graph, drawing);
  }

  private renderSteps(run: Run): void {
    const body = h("tbody");
    for (const step of run.steps ?? []) {
      const took = step.started_at && step.finished_at
        ? seconds((Date.parse(step.finished_at) - Date.parse(step.started_at)) / 1000) : "";
      const error = step.error && typeof step.error.message === "string" ? step.error.message : "";
      body.append(h("tr", { "data-step": step.name, "data-state": step.state },
        h("th", { scope: "row" }, h("a", { href: `#log-${step.name}` }, step.name)),
        h("td", {}, h("span", { class: `state s-${step.state}`, "data-field": "state" }, step.state)),
        h("td", { "data-field": "attempts" }, step.attempts),
        h("td", {}, time(step.started_at)), h("td", {}, took),
        h("td", { class: "detail" }, short(error, 200))));
    }
    clear(this.steps, h("table", { class: "grid", id: "steps" },
      h("caption", {}, "Steps"),
      h("thead", {}, h("tr", {}, ...["Step", "State", "Attempts", "Started", "Took", "Error"]
        .map((c) => h("th", { scope: "col" }, c)))), body));
  }

  private renderTimeline(events: Event[]): void {
    const all = bars(events);
    if (all.length === 0) { clear(this.timeline, h("p", {}, "No step has started yet.")); return; }
    const last = events.length ? Date.parse(events[events.length - 1].recorded_at) : Date.now();
    const end = this.at === null && this.run !== null && !TERMINAL.has(this.run.state) ? Math.max(Date.now(), last) : last;
    const start = Math.min(...all.map((b) => b.segments[0]?.from ?? end));
    const span = Math.max(1, end - start);
    const label = 170, width = 900, row = 22;
    const px = (t: number): number => label + ((t - start) / span) * (width - label - 10);
    const drawing = svg("svg", { viewBox: `0 0 ${width} ${all.length * row + 24}`, class: "bars",
                                 role: "img", "aria-label": `${all.length} step attempts on a time axis` });
    all.forEach((bar: Bar, i) => {
      const g = svg("g", { class: "attempt-row", "data-step": bar.step, "data-attempt": bar.attempt,
                           "data-outcome": bar.outcome });
      g.append(svg("text", { x: 4, y: i * row + 15, class: "label" }, `${short(bar.step, 16)} #${bar.attempt}`));
      for (const seg of bar.segments) {
        const to = seg.to ?? end;
        const w = Math.max(2, px(to) - px(seg.from));
        g.append(svg("rect", { x: px(seg.from), y: i * row + 4, width: w, height: row - 8,
                               class: `seg p-${seg.phase}`, "data-phase": seg.phase },
          svg("title", {}, `${bar.step} attempt ${bar.attempt}: ${seg.phase} ${seconds((to - seg.from) / 1000)} (${seg.note})`)));
      }
      drawing.append(g);
    });
    const axis = all.length * row + 16;
    drawing.append(svg("text", { x: label, y: axis, class: "axis" }, time(new Date(start).toISOString())),
                   svg("text", { x: width - 10, y: axis, class: "axis end" }, `+${seconds(span / 1000)}`));
    const legend = h("ul", { class: "legend", "aria-label": "Phases" },
      ...(["queued", "waiting", "running", "retrying"] as const).map((p) =>
        h("li", {}, h("span", { class: `swatch p-${p}` }), p)));
    clear(this.timeline, legend, drawing);
  }

  private renderTabs(run: Run): void {
    const steps = run.steps ?? [];
    if (this.tabs.childElementCount !== steps.length) {
      clear(this.tabs);
      for (const step of steps) {
        const tab = h("button", { type: "button", role: "tab", id: `tab-${step.name}`,
                                  "data-step": step.name, "aria-controls": "log-panel" }, step.name);
        tab.addEventListener("click", () => this.select(step.name));
        tab.addEventListener("keydown", (event) => this.tabKey(event, step.name));
        this.tabs.append(tab);
      }
      if (this.selected === null) {
        const first = steps.find((s) => s.state === "failed" || s.state === "timed_out")
          ?? steps.find((s) => LIVE.has(s.state)) ?? steps.find((s) => s.name === run.step) ?? steps[0];
        if (first !== undefined) this.select(first.name);
      }
    }
    for (const tab of this.tabs.querySelectorAll<HTMLButtonElement>("[role=tab]")) {
      const step = steps.find((s) => s.name === tab.dataset.step);
      tab.className = `tab s-${step?.state ?? "pending"}`;
      const on = tab.dataset.step === this.selected;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
    }
  }

  private tabKey(event: KeyboardEvent, name: string): void {
    const names = (this.run?.steps ?? []).map((s) => s.name);
    const i = names.indexOf(name);
    const to = event.key === "ArrowRight" ? names[(i + 1) % names.length]
      : event.key === "ArrowLeft" ? names[(i - 1 + names.length) % names.length] : null;
    if (to) { event.preventDefault(); this.select(to); document.getElementById(`tab-${to}`)?.focus(); }
  }

  select(name: string): LogPane {
    this.selected = name;
    let pane = this.panes.get(name);
    if (pane === undefined) {
      pane = new LogPane(this.id, name);
      pane.endedAttempts = this.run?.steps?.find((s) => s.name === name)?.attempts ?? 0;
      this.panes.set(name, pane);
      pane.start();
    }
    clear(this.pane, h("div", { role: "tabpanel", id: "log-panel", "aria-labelledby": `tab-${name}` }, pane.element));
    if (this.run) this.renderTabs(this.run);
    return pane;
  }

  private openFromHash(): void {
    const match = /^#log-(.+?)(?:-L(\d+))?$/.exec(decodeURIComponent(location.hash));
    if (match === null || !(this.run?.steps ?? []).some((s) => s.name === match[1])) return;
    const pane = this.select(match[1]);
    if (match[2]) pane.reveal(Number(match[2]));
    else this.tabs.scrollIntoView({ block: "start" });
  }

  private renderEvents(events: Event[]): void {
    const body = h("tbody");
    for (const event of [...events].reverse()) {
      const d = event.data;
      const failure = (d.error as Record<string, unknown> | undefined)?.message;
      const detail = typeof d.reason === "string" ? d.reason
        : typeof failure === "string" ? failure : "";
      const go = h("button", { type: "button", class: "link", "aria-label": `Show the run as of event ${event.seq}` }, event.seq);
      go.addEventListener("click", () => { void this.travelTo(event.seq); this.slider.focus(); });
      body.append(h("tr", { "data-seq": event.seq, "data-type": event.type },
        h("td", {}, go), h("td", {}, event.type), h("td", {}, String(d.step ?? "")),
        h("td", {}, String(d.attempt ?? event.meta.attempt ?? "")), h("td", {}, String(event.meta.actor ?? "")),
        h("td", {}, time(event.recorded_at)),
        h("td", { class: typeof failure === "string" || event.type.endsWith("failed") ? "detail bad" : "detail" },
          short(detail, 160))));
    }
    clear(this.eventList, h("table", { class: "grid", id: "events" },
      h("thead", {}, h("tr", {}, ...["Seq", "Type", "Step", "Attempt", "Actor", "Recorded", "Detail"]
        .map((c) => h("th", { scope: "col" }, c)))), body));
  }

  // -- operator actions

  private renderActions(): void {
    const run = this.run;
    if (run === null) return;
    const may = this.who.scope === "operate" || this.who.scope === "admin";
    const why = may ? "" : `needs an operate token (${this.who.name ? `${this.who.name} has scope ${this.who.scope}` : "you are not logged in"})`;
    const ended = TERMINAL.has(run.state);
    const retryable = run.state === "failed" || run.state === "cancelled";
    const from = h("select", { id: "retry-from", disabled: !may || !retryable });
    from.append(h("option", { value: "" }, "the failed step"));
    for (const step of run.steps ?? []) from.append(h("option", { value: step.name }, step.name));
    const previous = this.actions.querySelector<HTMLSelectElement>("#retry-from")?.value ?? "";
    from.value = previous;
    const button = (label: string, enabled: boolean, reason: string, act: () => Promise<unknown>, id: string): HTMLButtonElement => {
      const b = h("button", { type: "button", id, disabled: !may || !enabled, title: !may ? why : enabled ? null : reason }, label);
      b.addEventListener("click", () => { void this.confirm(label, act); });
      return b;
    };
    // approval steps that wait for a person: who may decide is the step's `approvers` (none: any operator)
    const approvers = (step: Step): string[] | null => {
      const asked = this.events.filter((e) => e.type === "step.waiting" && e.data.step === step.name).pop();
      return asked !== undefined && Array.isArray(asked.data.approvers) ? asked.data.approvers.map(String) : null;
    };
    const waiting = (run.steps ?? []).filter((s: Step) => s.state === "waiting" && approvers(s) !== null);
    const mayDecide = (s: Step): boolean => {
      const names = approvers(s) ?? [];
      return names.length === 0 || (this.who.name !== null && names.includes(this.who.name));
    };
    clear(this.actions,
      h("label", { for: "retry-from" }, "Retry from"), from,
      button("Retry", retryable, "only a failed or cancelled run can be retried",
             (reason?: string) => this.act("retry", { reason, from_step: from.value || undefined }), "act-retry"),
      button("Rerun", true, "", () => this.act("rerun", {}), "act-rerun"),
      button("Cancel", !ended, "the run has ended", (reason?: string) => this.act("cancel", { reason }), "act-cancel"),
      ...waiting.flatMap((s) => {
        const only = `only ${(approvers(s) ?? []).join(", ")} may decide`;
        return [
          button(`Approve ${s.name}`, mayDecide(s), only, (reason?: string) => this.act(`steps/${s.name}/approve`, { reason }), `act-approve-${s.name}`),
          button(`Reject ${s.name}`, mayDecide(s), only, (reason?: string) => this.act(`steps/${s.name}/reject`, { reason }), `act-reject-${s.name}`),
        ];
      }),
      may ? null : h("span", { class: "hint", id: "actions-hint" }, `Buttons are disabled: ${why}.`));
  }

  private async act(path: string, body: Record<string, string | undefined>): Promise<void> {
    const clean = Object.fromEntries(Object.entries(body).filter(([, v]) => v));
    const answer = await call<Run>(`/api/v1/runs/${this.id}/${path}`, { method: "POST", body: clean });
    if (path === "rerun") {
      this.notice.replaceChildren("Rerun started: ", h("a", { href: `/runs/${encodeURIComponent(answer.id)}` }, `run ${short(answer.id, 8)}`));
    } else {
      this.notice.textContent = `${path.split("/").pop()} recorded.`;
    }
    this.scheduleRefresh();
  }

  private confirm(label: string, act: (reason?: string) => Promise<unknown>): Promise<void> {
    const reason = h("textarea", { id: "reason-text", rows: 3, maxlength: 2048, required: label !== "Rerun" });
    const error = h("p", { class: "error", role: "alert" });
    const ok = h("button", { type: "submit", id: "reason-ok" }, label);
    const cancel = h("button", { type: "button", id: "reason-cancel" }, "Back");
    const form = h("form", { method: "dialog" },
      h("h2", {}, `${label} this run`),
      ...(label === "Rerun" ? [h("p", {}, "A new run for the same push (a rerun records no reason).")]
        : [h("label", { for: "reason-text" }, "Reason (recorded with the event)"), reason]), error,
      h("div", { class: "buttons" }, ok, cancel));
    clear(this.dialog, form);
    cancel.addEventListener("click", () => this.dialog.close());
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      ok.disabled = true;
      act(reason.value.trim() || undefined).then(() => this.dialog.close(), (failure: Error) => {
        error.textContent = failure.message;
        ok.disabled = false;
      });
    });
    this.dialog.showModal();
    (label === "Rerun" ? ok : reason).focus();
    return Promise.resolve();
  }
}
