// One bar per step attempt, from the run's events: where each attempt's time went.
// step.started opens an attempt (or ends the wait of one that waited for its lock);
// step.waiting opens one that waits (an approval, a lock); a result closes it, and its
// `ran` (the worker's own start and end) splits queued from running; step.retry_scheduled
// adds the pause before the next attempt.

import type { Event } from "./api";

export type Phase = "queued" | "waiting" | "running" | "retrying";

export interface Segment { phase: Phase; from: number; to: number | null; note: string }

export interface Bar { step: string; attempt: number; segments: Segment[]; outcome: string }

const RESULTS = new Set(["step.succeeded", "step.failed", "step.skipped", "step.timed_out",
                         "step.approved", "step.rejected"]);

function at(iso: unknown): number | null {
  if (typeof iso !== "string") return null;
  const value = Date.parse(iso);
  return Number.isNaN(value) ? null : value;
}

function close(bar: Bar | undefined, when: number): void {
  for (const segment of bar?.segments ?? []) if (segment.to === null) segment.to = when;
}

export function bars(events: Event[]): Bar[] {
  const all: Bar[] = [];
  const open = new Map<string, Bar>();  // step -> its latest attempt
  for (const event of events) {
    const when = Date.parse(event.recorded_at);
    const step = typeof event.data.step === "string" ? event.data.step : "";
    const attempt = typeof event.data.attempt === "number" ? event.data.attempt : 0;
    const latest = open.get(step);
    if (event.type === "step.waiting") {
      close(latest, when);
      const note = typeof event.data.lock === "string" ? `lock ${event.data.lock}` : "approval";
      const bar: Bar = { step, attempt, outcome: "waiting",
                         segments: [{ phase: "waiting", from: when, to: null, note }] };
      all.push(bar);
      open.set(step, bar);
    } else if (event.type === "step.started") {
      const waited = latest !== undefined && latest.outcome === "waiting"
        && latest.attempt === attempt;
      close(latest, when);
      const running: Segment = { phase: "running", from: when, to: null, note: "started" };
      if (waited) {
        latest.segments.push(running);
        latest.outcome = "running";
      } else {
        const bar: Bar = { step, attempt, outcome: "running", segments: [running] };
        all.push(bar);
        open.set(step, bar);
      }
    } else if (RESULTS.has(event.type) && latest !== undefined) {
      close(latest, when);
      latest.outcome = event.type.slice("step.".length);
      split(latest, event.data.ran);
    } else if (event.type === "step.retry_scheduled" && latest !== undefined) {
      const due = at(event.data.due_at) ?? at(event.data.not_before);
      latest.segments.push({ phase: "retrying", from: when, to: null,
                             note: due === null ? "backoff" : `next attempt due ${new Date(due).toLocaleTimeString()}` });
    } else if (event.type === "run.cancelled" || event.type === "run.retried") {
      for (const bar of open.values()) close(bar, when);
    }
  }
  return all;
}

// The worker's own times split the attempt's started..result span: queued before it began,
// running while it ran (what is left after it, the result's way back, counts as running).
function split(bar: Bar, ran: unknown): void {
  const last = bar.segments[bar.segments.length - 1];
  if (last === undefined || last.phase !== "running" || typeof ran !== "object" || ran === null) {
    return;
  }
  const began = at((ran as Record<string, unknown>).started_at);
  if (began === null || began <= last.from || last.to === null || began >= last.to) return;
  bar.segments.splice(bar.segments.length - 1, 1,
                      { phase: "queued", from: last.from, to: began, note: "on its way to a worker" },
                      { phase: "running", from: began, to: last.to, note: "ran" });
}
