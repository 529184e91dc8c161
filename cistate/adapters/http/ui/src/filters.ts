// The filter forms of the runs and audit pages: the fields are the page's query string, so
// a filtered view is a link.

import { h } from "./dom";

export interface Field { name: string; label: string; kind?: "text" | "time" | "select"; options?: string[]; hint?: string }

function toLocal(iso: string): string {
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return "";
  const local = new Date(at.getTime() - at.getTimezoneOffset() * 60000);
  return local.toISOString().slice(0, 16);
}

export function filterForm(fields: Field[], onChange: (values: Record<string, string>) => void): { form: HTMLFormElement; values: () => Record<string, string> } {
  const params = new URLSearchParams(location.search);
  const inputs = new Map<string, HTMLInputElement | HTMLSelectElement>();
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filters" });
  for (const field of fields) {
    const id = `f-${field.name}`;
    let input: HTMLInputElement | HTMLSelectElement;
    if (field.kind === "select") {
      input = h("select", { id, name: field.name });
      input.append(h("option", { value: "" }, "any"));
      for (const option of field.options ?? []) input.append(h("option", { value: option }, option));
      input.value = params.get(field.name) ?? "";
    } else if (field.kind === "time") {
      input = h("input", { id, name: field.name, type: "datetime-local" });
      input.value = toLocal(params.get(field.name) ?? "");
    } else {
      input = h("input", { id, name: field.name, type: "text", placeholder: field.hint ?? "", spellcheck: false, autocomplete: "off" });
      input.value = params.get(field.name) ?? "";
    }
    inputs.set(field.name, input);
    form.append(h("div", { class: "field" }, h("label", { for: id }, field.label), input));
  }
  const reset = h("button", { type: "reset" }, "Clear");
  form.append(h("div", { class: "field buttons" }, h("button", { type: "submit" }, "Filter"), reset));
  const values = (): Record<string, string> => {
    const out: Record<string, string> = {};
    for (const field of fields) {
      const value = inputs.get(field.name)?.value.trim() ?? "";
      if (!value) continue;
      out[field.name] = field.kind === "time" ? new Date(value).toISOString() : value;
    }
    return out;
  };
  const apply = (): void => {
    const current = values();
    history.replaceState(null, "", `${location.pathname}${Object.keys(current).length ? `?${new URLSearchParams(current)}` : ""}`);
    onChange(current);
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
  form.addEventListener("reset", () => setTimeout(apply, 0));
  return { form, values };
}
