// The table: every file, sorted, filtered and paged by the server; the view lives in the URL.
"use strict";

const form = document.getElementById("filters");
const body = document.querySelector("#songs tbody");
const message = document.getElementById("message");
let state = new URLSearchParams(location.search);
let filled = false;
let latest = 0; // answers to older requests are dropped: typing fires several

function fillChoices(choices) {
  for (const name of ["status", "flag"]) {
    for (const value of choices[name]) form[name].append(element("option", { value }, value.replace("_", " ")));
  }
  for (const value of choices.size) form.size.append(element("option", { value }, String(value)));
  for (const name of ["q", "status", "flag", "below"]) form[name].value = state.get(name) || "";
  form.size.value = state.get("size") || "50";
  filled = true;
}

function cell(row, text, className) {
  const td = row.insertCell();
  if (className) td.className = className;
  if (text !== undefined && text !== null) td.textContent = text;
  return td;
}

function render(answer) {
  const view = viewOf(state).toString();
  body.replaceChildren();
  for (const song of answer.rows) {
    const row = body.insertRow();
    row.dataset.id = song.id;
    cell(row).append(element("span", { class: `status ${song.status}` }, song.status));
    cell(row, null, "path").append(element("a", { href: `/file/${song.id}${view ? "?" + view : ""}` }, song.path));
    cell(row, duration(song.duration), "number");
    cell(row, song.caption, "caption");
    cell(row, song.lyrics, "lyrics");
    cell(row, song.language);
    cell(row, song.bpm, "number");
    cell(row, song.keyscale);
    cell(row, song.timesignature);
    const values = Object.values(song.confidence).filter((v) => v !== null);
    const lowest = values.length ? Math.min(...values) : null;
    cell(row, confidence(lowest), lowest !== null && lowest < 0.5 ? "number low" : "number");
    const flags = cell(row, null, "flags");
    for (const flag of song.flags) flags.append(element("span", { class: `flag ${flag}` }, flag.replace("_", " ")));
  }
  const counts = answer.counts;
  document.getElementById("counts").textContent =
    `${counts.all} files · ${counts.approved} approved · ${counts.edited} edited · ${counts.unreviewed} unreviewed`;
  document.getElementById("page").textContent =
    `${answer.total} shown · page ${answer.page} of ${answer.pages}`;
  document.getElementById("previous").disabled = answer.page <= 1;
  document.getElementById("next").disabled = answer.page >= answer.pages;
  for (const th of document.querySelectorAll("th[data-sort]")) {
    const sorted = th.dataset.sort === (state.get("sort") || "path");
    th.classList.toggle("sorted", sorted);
    th.classList.toggle("descending", sorted && state.get("desc") === "1");
  }
  message.textContent = answer.total ? "" : "No file matches these filters.";
}

async function load() {
  const ask = ++latest;
  try {
    const answer = await api(`/api/songs?${state}`);
    if (ask !== latest) return;
    if (!filled) fillChoices(answer.choices);
    state.set("page", answer.page);
    render(answer);
  } catch (error) {
    message.textContent = error.message;
  }
}

let typing;

function change(update, push = false, wait = 0) {
  update(state);
  for (const [key, value] of [...state]) if (value === "") state.delete(key);
  history[push ? "pushState" : "replaceState"](null, "", `?${state}`);
  clearTimeout(typing);
  typing = setTimeout(load, wait); // typing waits for a pause before asking the server
}

form.addEventListener("input", (event) => {
  const name = event.target.name;
  change((s) => { s.set(name, event.target.value); s.delete("page"); }, false, name === "q" || name === "below" ? 200 : 0);
});
form.addEventListener("submit", (event) => event.preventDefault());

document.querySelector("#songs thead").addEventListener("click", (event) => {
  const key = event.target.closest("th")?.dataset.sort;
  if (!key) return;
  const same = (state.get("sort") || "path") === key;
  change((s) => { s.set("sort", key); s.set("desc", same && s.get("desc") !== "1" ? "1" : ""); }, true);
});

body.addEventListener("click", (event) => {
  const row = event.target.closest("tr");
  if (row && !event.target.closest("a")) row.querySelector("a").click();
});

document.getElementById("previous").addEventListener("click", () =>
  change((s) => s.set("page", Number(s.get("page") || 1) - 1), true));
document.getElementById("next").addEventListener("click", () =>
  change((s) => s.set("page", Number(s.get("page") || 1) + 1), true));

document.addEventListener("keydown", (event) => {
  if (event.key === "/" && document.activeElement !== form.q) {
    event.preventDefault();
    form.q.focus();
  }
});
window.addEventListener("popstate", () => {
  state = new URLSearchParams(location.search);
  for (const name of ["q", "status", "flag", "below"]) form[name].value = state.get(name) || "";
  load();
});

load();
