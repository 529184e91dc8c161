// The runs page: the run list with the audit filters, keyset pages, and live states.

import { call, query, type Run } from "./api";
import { clear, h, short, time } from "./dom";
import { filterForm } from "./filters";

const STATES = ["queued", "running", "waiting", "succeeded", "failed", "cancelled"];
const POLL_MS = 2000;

export async function runsPage(main: HTMLElement): Promise<void> {
  document.title = "Runs · cistate";
  let filters: Record<string, string> = {};
  let cursors: (string | null)[] = [null];  // the cursor of each page seen, first to current
  let next: string | null = null;
  const table = h("div", { class: "table-holder" });
  const status = h("p", { class: "notice", role: "status" });
  const older = h("button", { type: "button", id: "older" }, "Older runs");
  const newer = h("button", { type: "button", id: "newer" }, "Newer runs");
  const { form, values } = filterForm([
    { name: "repo", label: "Repository", hint: "clone URL" },
    { name: "ref", label: "Ref", hint: "refs/heads/main" },
    { name: "commit", label: "Commit", hint: "prefix" },
    { name: "state", label: "State", kind: "select", options: STATES },
    { name: "step", label: "Step" },
    { name: "pipeline", label: "Pipeline" },
    { name: "since", label: "Since", kind: "time" },
    { name: "until", label: "Until", kind: "time" },
  ], (current) => { filters = current; cursors = [null]; void load(); });
  filters = values();
  clear(main, h("h1", {}, "Runs"), form, status, table,
        h("nav", { class: "pages", "aria-label": "Pages of runs" }, newer, older));
  older.addEventListener("click", () => { if (next) { cursors.push(next); void load(); } });
  newer.addEventListener("click", () => { if (cursors.length > 1) { cursors.pop(); void load(); } });

  let rows = new Map<string, HTMLTableRowElement>();
  async function load(quiet = false): Promise<void> {
    const cursor = cursors[cursors.length - 1];
    try {
      const page = await call<{ runs: Run[]; next_cursor: string | null }>(
        `/api/v1/runs${query({ ...filters, cursor, limit: "50" })}`);
      next = page.next_cursor;
      older.disabled = next === null;
      newer.disabled = cursors.length <= 1;
      const ids = page.runs.map((r) => r.id).join();
      if (ids === Array.from(rows.keys()).join()) {
        for (const run of page.runs) update(rows.get(run.id), run);  // live: states in place
      } else {
        rows = new Map(page.runs.map((run) => [run.id, row(run)]));
        clear(table, page.runs.length === 0 ? h("p", {}, "No run matches.") : h("table", { class: "grid", id: "runs" },
          h("thead", {}, h("tr", {}, ...["State", "Run", "Repository", "Ref", "Commit", "Pipeline", "Step", "Created", "Updated"]
            .map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, ...rows.values())));
      }
      status.textContent = quiet ? status.textContent : `${page.runs.length} runs${cursors.length > 1 ? ` (page ${cursors.length})` : ""}, updated live.`;
    } catch (error) {
      status.textContent = `The runs could not be loaded: ${(error as Error).message}`;
    }
  }
  await load();
  performance.mark("cistate:first-render");
  setInterval(() => { if (!document.hidden) void load(true); }, POLL_MS);
}

function row(run: Run): HTMLTableRowElement {
  const tr = h("tr", { "data-run": run.id },
    h("td", {}, h("span", { class: `state s-${run.state}`, "data-field": "state" }, run.state)),
    h("td", {}, h("a", { href: `/runs/${encodeURIComponent(run.id)}` }, h("code", {}, short(run.id, 8)))),
    h("td", { class: "wrap" }, run.repo), h("td", {}, run.ref),
    h("td", {}, h("code", {}, short(run.commit, 10))), h("td", {}, run.pipeline),
    h("td", { "data-field": "step" }, run.step ?? ""), h("td", {}, time(run.created_at)),
    h("td", { "data-field": "updated" }, time(run.updated_at)));
  return tr;
}

function update(tr: HTMLTableRowElement | undefined, run: Run): void {
  if (tr === undefined) return;
  const state = tr.querySelector<HTMLElement>("[data-field=state]");
  if (state !== null && state.textContent !== run.state) {
    state.textContent = run.state;
    state.className = `state s-${run.state}`;
  }
  const step = tr.querySelector<HTMLElement>("[data-field=step]");
  if (step !== null) step.textContent = run.step ?? "";
  const updated = tr.querySelector<HTMLElement>("[data-field=updated]");
  if (updated !== null) updated.textContent = time(run.updated_at);
}
