// A step's log pane: the step's output followed live (server-sent events), with search,
// a jump to the failing line and a link to every line (#log-<step>-L<n>).

import { stream } from "./api";
import { h } from "./dom";

const FAILING = /\b(error|errors|failed|failure|fatal|exception|panic|not ok)\b|exit (status|code) [1-9]/i;

export class LogPane {
  readonly element: HTMLElement;
  private readonly lines: HTMLElement;
  private readonly status: HTMLElement;
  private readonly matches: HTMLElement;
  private readonly search: HTMLInputElement;
  private readonly follow: HTMLInputElement;
  private readonly failButton: HTMLButtonElement;
  private count = 0;
  private partial: HTMLElement | null = null;
  private abort: AbortController | null = null;
  private hits: HTMLElement[] = [];
  private hit = -1;
  private wanted: number | null = null;
  ended = false;
  endedAttempts = 0;

  constructor(readonly runId: string, readonly step: string) {
    const id = `logpane-${step}`;
    this.search = h("input", { type: "search", id: `${id}-search`, placeholder: "Search the log" });
    this.follow = h("input", { type: "checkbox", id: `${id}-follow`, checked: true });
    this.failButton = h("button", { type: "button", class: "jump-failure", disabled: true },
      "Jump to the failing line");
    const next = h("button", { type: "button", "aria-label": "Next match" }, "Next");
    const prev = h("button", { type: "button", "aria-label": "Previous match" }, "Previous");
    this.matches = h("span", { class: "matches", "aria-live": "polite" });
    this.status = h("p", { class: "log-status", role: "status" }, "Waiting for output…");
    this.lines = h("div", { class: "log", id: `log-${step}`, tabindex: 0, role: "log",
                            "aria-label": `Log of step ${step}` });
    this.element = h("section", { class: "logpane", "data-step": step, "aria-label": `Log of ${step}` },
      h("div", { class: "log-tools" },
        h("label", { for: `${id}-search` }, "Search"), this.search, prev, next, this.matches,
        h("label", { class: "check" }, this.follow, " Follow"), this.failButton),
      this.status, this.lines);
    this.search.addEventListener("input", () => this.find());
    this.search.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); this.step_(event.shiftKey ? -1 : 1); }
    });
    next.addEventListener("click", () => this.step_(1));
    prev.addEventListener("click", () => this.step_(-1));
    this.failButton.addEventListener("click", () => this.jumpToFailure());
  }

  start(): void {
    this.stop();
    this.lines.replaceChildren();
    this.count = 0;
    this.partial = null;
    this.ended = false;
    this.status.textContent = "Waiting for output…";
    const abort = new AbortController();
    this.abort = abort;
    void this.read(abort);
  }

  stop(): void {
    this.abort?.abort();
    this.abort = null;
  }

  get following(): boolean { return this.abort !== null && !this.ended; }

  private async read(abort: AbortController): Promise<void> {
    const path = `/api/v1/runs/${encodeURIComponent(this.runId)}/steps/${encodeURIComponent(this.step)}/log?follow=1`;
    try {
      for await (const message of stream(path, abort.signal)) {
        const data = JSON.parse(message.data) as Record<string, unknown>;
        if (message.event === "log" && typeof data.text === "string") {
          this.append(data.text);
          this.status.textContent = "Following the step's output as it comes.";
        } else if (message.event === "end") {
          this.ended = true;
          const exit = typeof data.exit_status === "number" ? `, exit status ${data.exit_status}` : "";
          this.status.textContent = `Step ${String(data.state)}${exit}. `
            + (this.count ? `${this.count} lines.` : "It printed nothing.");
          const failed = data.state === "failed" || data.state === "timed_out";
          this.failButton.disabled = !failed || this.count === 0;
        }
      }
    } catch (error) {
      if (abort.signal.aborted) return;
      this.status.textContent = `The log could not be read: ${(error as Error).message}`;
    }
  }

  append(text: string): void {
    const pieces = text.split("\n");
    const fragment = document.createDocumentFragment();
    pieces.forEach((piece, index) => {
      if (index === 0 && this.partial !== null) {
        const body = this.partial.lastElementChild as HTMLElement;
        body.textContent = (body.textContent ?? "") + piece;
      } else if (index === pieces.length - 1 && piece === "") {
        return;  // the text ended with its line: the next piece starts a new one
      } else {
        this.partial = this.line(piece);
        fragment.append(this.partial);
      }
      if (index < pieces.length - 1) this.partial = null;
    });
    this.lines.append(fragment);
    if (this.search.value) this.find();
    if (this.wanted !== null && this.wanted <= this.count) this.show(this.wanted);
    else if (this.follow.checked) this.lines.scrollTop = this.lines.scrollHeight;
  }

  private line(text: string): HTMLElement {
    this.count += 1;
    const n = this.count;
    const anchor = `log-${this.step}-L${n}`;
    const header = text.startsWith("--- attempt ") && text.endsWith(" ---");
    return h("div", { class: header ? "line attempt" : "line", id: anchor, "data-line": n },
      h("a", { class: "ln", href: `#${anchor}`, "aria-label": `Line ${n}` }, n),
      h("span", { class: "text" }, text));
  }

  // the line to show once it is there (a deep link)
  reveal(line: number): void {
    this.wanted = line;
    if (line <= this.count) this.show(line);
  }

  private show(line: number): void {
    const el = document.getElementById(`log-${this.step}-L${line}`);
    if (el === null) return;
    this.wanted = null;
    this.follow.checked = false;
    for (const old of this.lines.querySelectorAll(".line.target")) old.classList.remove("target");
    el.classList.add("target");
    el.scrollIntoView({ block: "center" });
  }

  jumpToFailure(): void {
    const all = Array.from(this.lines.querySelectorAll<HTMLElement>(".line"));
    let start = 0;  // the latest attempt's lines
    all.forEach((el, i) => { if (el.classList.contains("attempt")) start = i; });
    const latest = all.slice(start);
    const failing = latest.filter((el) => FAILING.test(el.textContent ?? "")).pop()
      ?? latest.filter((el) => (el.lastElementChild?.textContent ?? "").trim() !== "").pop();
    if (failing === undefined) return;
    const n = Number(failing.dataset.line);
    history.replaceState(null, "", `#log-${this.step}-L${n}`);
    this.show(n);
    (failing.firstElementChild as HTMLElement).focus();
  }

  private find(): void {
    for (const el of this.hits) el.classList.remove("hit", "current");
    const needle = this.search.value.toLowerCase();
    this.hits = needle ? Array.from(this.lines.querySelectorAll<HTMLElement>(".line"))
      .filter((el) => (el.lastElementChild?.textContent ?? "").toLowerCase().includes(needle)) : [];
    for (const el of this.hits) el.classList.add("hit");
    this.hit = -1;
    this.matches.textContent = needle ? `${this.hits.length} matching lines` : "";
  }

  private step_(by: number): void {
    if (this.hits.length === 0) return;
    this.hits[this.hit]?.classList.remove("current");
    this.hit = (this.hit + by + this.hits.length) % this.hits.length;
    const el = this.hits[this.hit];
    el.classList.add("current");
    this.follow.checked = false;
    el.scrollIntoView({ block: "center" });
    this.matches.textContent = `match ${this.hit + 1} of ${this.hits.length}`;
  }
}
