// The web UI's entry: log in (the API token, kept in this browser session), then draw the
// page the path names: / (runs), /runs/<id> (one run), /audit (events).

import { ApiError, call, setToken, token, type Who } from "./api";
import { auditPage } from "./audit";
import { clear, h } from "./dom";
import { RunPage } from "./run";
import { runsPage } from "./runs";

const RUN_PATH = /^\/runs\/([0-9a-fA-F-]{36})$/;

function main(): HTMLElement { return document.getElementById("main") as HTMLElement; }

async function whoami(given: string | null): Promise<Who> {
  return await call<Who>("/api/v1/whoami", { token: given });
}

function showWho(who: Who): void {
  const where = document.getElementById("who") as HTMLElement;
  const logout = document.getElementById("logout") as HTMLButtonElement;
  if (who.name === null) {
    clear(where, "Reading without a token · ");
    const login = h("button", { type: "button", class: "link", id: "login-link" }, "Log in");
    login.addEventListener("click", () => loginForm(null));
    where.append(login);
    logout.hidden = true;
  } else {
    clear(where, "Logged in as ", h("strong", { id: "who-name" }, who.name), ` (${who.scope})`);
    logout.hidden = false;
  }
  logout.onclick = () => { setToken(null); location.reload(); };
}

function loginForm(message: string | null): void {
  document.title = "Log in · cistate";
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off",
                             required: true, spellcheck: false, "aria-describedby": "token-help" });
  const error = h("p", { class: "error", id: "login-error", role: "alert" }, message ?? "");
  const submit = h("button", { type: "submit", id: "login" }, "Log in");
  const form = h("form", { class: "login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Log in to cistate"),
    h("label", { for: "token" }, "API token"), input,
    h("p", { id: "token-help", class: "hint" },
      "A token of CISTATE_API_TOKEN. It stays in this browser tab's session and is sent only to this service."),
    error, submit);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit.disabled = true;
    error.textContent = "";
    const given = input.value.trim();
    whoami(given).then((who) => {
      setToken(given);
      if (started) location.reload();  // a page drew already (reading without a token): anew
      else void start(who);
    }, (failure: unknown) => {
      error.textContent = failure instanceof ApiError && failure.status === 401
        ? "This token was refused: the service knows no such token. Check it and try again."
        : `Could not log in: ${(failure as Error).message}`;
      submit.disabled = false;
      input.select();
    });
  });
  clear(main(), form);
  input.focus();
}

let started = false;

async function start(who: Who): Promise<void> {
  started = true;
  showWho(who);
  const path = location.pathname;
  const run = RUN_PATH.exec(path);
  for (const link of document.querySelectorAll<HTMLAnchorElement>("nav a")) {
    if (link.getAttribute("href") === (path === "/audit" ? "/audit" : "/")) link.setAttribute("aria-current", "page");
  }
  try {
    if (run !== null) await new RunPage(main(), run[1].toLowerCase(), who).open();
    else if (path === "/audit") await auditPage(main());
    else await runsPage(main());
  } catch (failure) {
    if (failure instanceof ApiError && failure.status === 401) {
      setToken(null);
      loginForm("The service refused the token: log in again.");
      return;
    }
    clear(main(), h("h1", {}, "Something went wrong"), h("p", { class: "error", role: "alert" }, (failure as Error).message));
  }
}

async function boot(): Promise<void> {
  const given = token();
  try {
    await start(await whoami(given));
  } catch (failure) {
    if (given !== null) setToken(null);
    if (failure instanceof ApiError && failure.status === 503) {
      loginForm(failure.message);  // the server has no tokens: it says which to set
    } else if (failure instanceof ApiError && failure.status === 401) {
      loginForm(given !== null ? "The service no longer accepts this session's token: log in again." : null);
    } else {
      clear(main(), h("p", { class: "error", role: "alert" }, `The service cannot be reached: ${(failure as Error).message}`));
    }
  }
}

void boot();
