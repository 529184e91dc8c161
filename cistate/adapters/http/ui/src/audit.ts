// The audit page: events across runs with the filters of `cistate audit`, exported as JSON
// lines.

import { call, query, type Event } from "./api";
import { clear, h, short, time } from "./dom";
import { filterForm } from "./filters";

const EXPORT_LIMIT = 100_000;

export async function auditPage(main: HTMLElement): Promise<void> {
  document.title = "Audit · cistate";
  let filters: Record<string, string> = {};
  let cursors: (string | null)[] = [null];
  let next: string | null = null;
  const table = h("div", { class: "table-holder" });
  const status = h("p", { class: "notice", role: "status" });
  const older = h("button", { type: "button", id: "older" }, "Older events");
  const newer = h("button", { type: "button", id: "newer" }, "Newer events");
  const exportButton = h("button", { type: "button", id: "export" }, "Export as JSON lines");
  const { form, values } = filterForm([
    { name: "run_id", label: "Run", hint: "run id" },
    { name: "repo", label: "Repository", hint: "clone URL" },
    { name: "ref", label: "Ref", hint: "refs/heads/main" },
    { name: "commit", label: "Commit", hint: "prefix" },
    { name: "type", label: "Event type", hint: "run.retried" },
    { name: "step", label: "Step" },
    { name: "actor", label: "Actor", hint: "api:alice" },
    { name: "since", label: "Since", kind: "time" },
    { name: "until", label: "Until", kind: "time" },
  ], (current) => { filters = current; cursors = [null]; void load(); });
  filters = values();
  clear(main, h("h1", {}, "Audit"), form, h("div", { class: "actions" }, exportButton), status, table,
        h("nav", { class: "pages", "aria-label": "Pages of events" }, newer, older));
  older.addEventListener("click", () => { if (next) { cursors.push(next); void load(); } });
  newer.addEventListener("click", () => { if (cursors.length > 1) { cursors.pop(); void load(); } });
  exportButton.addEventListener("click", () => { void exportLines(filters, status, exportButton); });

  async function load(): Promise<void> {
    try {
      const page = await call<{ events: Event[]; next_cursor: string | null }>(
        `/api/v1/events${query({ ...filters, cursor: cursors[cursors.length - 1], limit: "100" })}`);
      next = page.next_cursor;
      older.disabled = next === null;
      newer.disabled = cursors.length <= 1;
      clear(table, page.events.length === 0 ? h("p", {}, "No event matches.") : h("table", { class: "grid", id: "audit" },
        h("thead", {}, h("tr", {}, ...["Position", "Run", "Seq", "Type", "Step", "Actor", "Recorded", "Detail"]
          .map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, ...page.events.map(row))));
      status.textContent = `${page.events.length} events${cursors.length > 1 ? ` (page ${cursors.length})` : ""}.`;
    } catch (error) {
      status.textContent = `The events could not be loaded: ${(error as Error).message}`;
    }
  }
  await load();
}

function row(event: Event): HTMLTableRowElement {
  const d = event.data;
  const error = d.error as Record<string, unknown> | undefined;
  const detail = typeof d.reason === "string" ? d.reason : typeof error?.message === "string" ? error.message : "";
  return h("tr", { "data-position": event.position, "data-type": event.type },
    h("td", {}, event.position),
    h("td", {}, h("a", { href: `/runs/${encodeURIComponent(event.run_id)}` }, h("code", {}, short(event.run_id, 8)))),
    h("td", {}, event.seq), h("td", {}, event.type), h("td", {}, String(d.step ?? "")),
    h("td", {}, String(event.meta.actor ?? "")), h("td", {}, time(event.recorded_at)),
    h("td", { class: typeof error?.message === "string" ? "detail bad" : "detail" }, short(detail, 120)));
}

async function exportLines(filters: Record<string, string>, status: HTMLElement, button: HTMLButtonElement): Promise<void> {
  button.disabled = true;
  const lines: string[] = [];
  let cursor: string | null = null;
  try {
    do {
      const page: { events: Event[]; next_cursor: string | null } = await call(
        `/api/v1/events${query({ ...filters, cursor, limit: "1000" })}`);
      for (const event of page.events) lines.push(JSON.stringify(event));
      cursor = page.next_cursor;
      status.textContent = `Exporting: ${lines.length} events…`;
    } while (cursor !== null && lines.length < EXPORT_LIMIT);
    const blob = new Blob(lines.map((line) => `${line}\n`), { type: "application/x-ndjson" });
    const link = h("a", { href: URL.createObjectURL(blob), download: "cistate-audit.jsonl" });
    document.body.append(link);
    link.click();
    link.remove();
    status.textContent = `Exported ${lines.length} events as JSON lines${cursor !== null ? ` (the first ${EXPORT_LIMIT}; narrow the filters for the rest)` : ""}.`;
  } catch (error) {
    status.textContent = `The export failed: ${(error as Error).message}`;
  } finally {
    button.disabled = false;
  }
}
