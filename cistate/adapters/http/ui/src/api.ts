// The service's HTTP API, with the bearer token the login put in this browser session.

const KEY = "cistate.token";

export interface Who { name: string | null; scope: string; reads_open: boolean }

export interface Step {
  name: string; state: string; attempts: number; outputs: Record<string, unknown>;
  error: Record<string, unknown> | null; started_at: string | null;
  finished_at: string | null; timing: Record<string, number> | null;
}

export interface Run {
  id: string; repo: string; ref: string; commit: string; pipeline: string; state: string;
  step: string | null; version: number; created_at: string | null; updated_at: string | null;
  rerun_of: string | null; holds: Record<string, string>; steps?: Step[];
  waiting_for?: unknown[];
}

export interface Event {
  position: number; run_id: string; seq: number; type: string;
  data: Record<string, unknown>; meta: Record<string, unknown>; recorded_at: string;
}

export class ApiError extends Error {
  constructor(readonly status: number, message: string) { super(message); }
}

export function token(): string | null { return sessionStorage.getItem(KEY); }
export function setToken(value: string | null): void {
  if (value === null) sessionStorage.removeItem(KEY); else sessionStorage.setItem(KEY, value);
}

function headers(given: string | null, extra: Record<string, string> = {}): Headers {
  const all = new Headers(extra);
  if (given) all.set("Authorization", `Bearer ${given}`);
  return all;
}

async function failure(response: Response): Promise<ApiError> {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json() as { error?: unknown };
    if (typeof body.error === "string") message = body.error;
  } catch { /* not JSON: the status says it */ }
  return new ApiError(response.status, message);
}

export async function call<T>(path: string, init: { method?: string; body?: unknown;
  token?: string | null; signal?: AbortSignal } = {}): Promise<T> {
  const given = init.token === undefined ? token() : init.token;
  const response = await fetch(path, {
    method: init.method ?? "GET",
    headers: headers(given, init.body === undefined ? {} : { "Content-Type": "application/json" }),
    body: init.body === undefined ? undefined : JSON.stringify(init.body),
    signal: init.signal,
  });
  if (!response.ok) throw await failure(response);
  return await response.json() as T;
}

export interface Message { event: string; data: string; id: string }

// Server-sent events through fetch (EventSource cannot send the Authorization header).
export async function* stream(path: string, signal: AbortSignal): AsyncGenerator<Message> {
  const response = await fetch(path, { headers: headers(token(), { Accept: "text/event-stream" }),
                                       signal });
  if (!response.ok || response.body === null) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end: number;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const message: Message = { event: "message", data: "", id: "" };
      const data: string[] = [];
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") message.event = text;
        else if (field === "data") data.push(text);
        else if (field === "id") message.id = text;
      }
      message.data = data.join("\n");
      yield message;
    }
  }
}

export function query(values: Record<string, string | null | undefined>): string {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(values)) if (value) params.set(name, value);
  const text = params.toString();
  return text ? `?${text}` : "";
}
