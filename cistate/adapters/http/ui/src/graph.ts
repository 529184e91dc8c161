// The pipeline's graph: which step needs which, from the spec the run pinned (its latest
// run.requested or run.pipeline_pinned event). A step without `needs` needs the one before
// it; `finally` steps come after all the others.

import type { Event } from "./api";

export interface Node { name: string; needs: string[]; column: number; row: number }

interface SpecStep { name?: unknown; needs?: unknown }

function specSteps(value: unknown): SpecStep[] {
  return Array.isArray(value) ? value.filter((s): s is SpecStep => typeof s === "object" && s !== null) : [];
}

export function needsOf(events: Event[], names: string[]): Map<string, string[]> {
  let spec: Record<string, unknown> | null = null;
  for (const event of events) {
    if ((event.type === "run.requested" || event.type === "run.pipeline_pinned")
        && typeof event.data.pipeline_spec === "object" && event.data.pipeline_spec !== null) {
      spec = event.data.pipeline_spec as Record<string, unknown>;
    }
  }
  const needs = new Map<string, string[]>();
  const main = specSteps(spec?.steps).map((s) => ({ name: String(s.name ?? ""), needs: s.needs }));
  const finals = specSteps(spec?.finally).map((s) => String(s.name ?? ""));
  const known = new Set(names);
  let previous: string | null = null;
  for (const name of names) {  // the run's own order: a step the spec lacks needs the one before
    const step = main.find((s) => s.name === name);
    if (finals.includes(name)) {
      needs.set(name, names.filter((n) => !finals.includes(n)));
    } else if (step !== undefined && Array.isArray(step.needs)) {
      needs.set(name, step.needs.map(String).filter((n) => known.has(n)));
    } else {
      needs.set(name, previous === null ? [] : [previous]);
    }
    if (!finals.includes(name)) previous = name;
  }
  return needs;
}

export function layout(names: string[], needs: Map<string, string[]>): Node[] {
  const column = new Map<string, number>();
  const depth = (name: string, seen: Set<string>): number => {
    const known = column.get(name);
    if (known !== undefined) return known;
    if (seen.has(name)) return 0;  // a cycle cannot be pinned; never loop on one
    seen.add(name);
    const value = Math.max(-1, ...(needs.get(name) ?? []).map((n) => depth(n, seen))) + 1;
    column.set(name, value);
    return value;
  };
  const rows = new Map<number, number>();
  return names.map((name) => {
    const col = depth(name, new Set());
    const row = rows.get(col) ?? 0;
    rows.set(col, row + 1);
    return { name, needs: needs.get(name) ?? [], column: col, row };
  });
}
