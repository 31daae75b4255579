// One file: its audio, its picture and every label, editable; saves go to the server, which keeps them.
"use strict";

const id = Number(location.pathname.split("/").pop());
const view = viewOf(new URLSearchParams(location.search));
const suffix = view.toString() ? `?${view}` : "";
const form = document.getElementById("labels");
const audio = document.getElementById("audio");
const image = document.getElementById("image");
const playhead = document.getElementById("playhead");
const message = document.getElementById("message");
const TEXT_FIELDS = ["caption", "lyrics", "bpm", "keyscale", "timesignature", "language"];
let song = null;
let dirty = false;

for (const note of ["C", "C#", "Db", "D", "D#", "Eb", "E", "F", "F#", "Gb", "G", "G#", "Ab", "A", "A#", "Bb", "B"]) {
  for (const mode of ["major", "minor"]) document.getElementById("keys").append(element("option", { value: `${note} ${mode}` }));
}

function same(a, b) {
  const blank = (v) => (v === null || v === undefined ? "" : String(v));
  return blank(a) === blank(b);
}

function values() {
  const fields = {};
  for (const name of TEXT_FIELDS) fields[name] = form[name].value;
  fields.is_instrumental = form.is_instrumental.checked;
  return fields;
}

function showMachine(name) {
  const label = form[name].closest("label");
  label.querySelector(".machine")?.remove();
  const machine = song.machine[name];
  const current = name === "is_instrumental" ? form[name].checked : form[name].value;
  if (same(current, machine)) return;
  const note = element("small", { class: "machine" }, `machine: ${machine === null ? "—" : String(machine).slice(0, 120)} `);
  const restore = element("a", { href: "#" }, "restore");
  restore.addEventListener("click", (event) => {
    event.preventDefault();
    if (name === "is_instrumental") form[name].checked = Boolean(machine);
    else form[name].value = machine ?? "";
    edited();
  });
  note.append(restore);
  label.append(note);
}

function edited() {
  dirty = true;
  for (const name of [...TEXT_FIELDS, "is_instrumental"]) showMachine(name);
}

function fill(answer) {
  song = { ...answer, view: answer.view || song?.view };
  document.title = `${song.path} · acecap review`;
  document.getElementById("path").textContent = song.path;
  document.getElementById("path").title = song.file;
  const status = document.getElementById("status");
  status.textContent = song.status;
  status.className = `status ${song.status}`;
  for (const name of TEXT_FIELDS) form[name].value = song.fields[name] ?? "";
  form.is_instrumental.checked = Boolean(song.fields.is_instrumental);
  for (const [name, field] of [["bpm", "bpm"], ["keyscale", "keyscale"], ["timesignature", "timesignature"]]) {
    const label = form[field].closest("label");
    label.querySelector(".conf")?.remove();
    const value = song.confidence[name];
    if (value !== null) label.append(element("span", { class: value < 0.5 ? "conf low" : "conf", title: "confidence" }, confidence(value)));
  }
  edited();
  dirty = false;
  const where = song.view;
  document.getElementById("position").textContent =
    where.position ? `${where.position} of ${where.total}` : `not in the table's current view`;
  document.getElementById("back").href = `/${suffix}`;
  for (const side of ["previous", "next"]) {
    const link = document.getElementById(side);
    link.hidden = where[side] === null;
    link.href = where[side] === null ? "#" : `/file/${where[side]}${suffix}`;
  }
  const about = document.getElementById("about");
  about.replaceChildren();
  const facts = [
    ["file", song.file],
    ["length", duration(song.duration)],
    ["flags", song.flags.join(", ") || "none"],
    ...Object.entries(song.models).map(([task, model]) => [`${task} by`, model]),
    ...Object.entries(song.errors).map(([task, error]) => [`${task} failed`, error]),
    ["reviewed", song.review ? `${song.review.reviewed_at}${song.review.approved ? ", approved" : ""}` : "not yet"],
  ];
  for (const [term, text] of facts) about.append(element("dt", {}, term), element("dd", {}, text));
}

async function save(approved) {
  message.textContent = "saving…";
  message.className = "message";
  try {
    const answer = await api(`/api/songs/${id}/review`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ fields: values(), approved, version: song.version }),
    });
    const next = song.view.next;
    fill(answer);
    const parts = [approved ? "approved" : "saved"];
    if (answer.written.length) parts.push(`updated ${answer.written.map((path) => path.split(/[\\/]/).pop()).join(", ")}`);
    if (answer.following.length) parts.push(`${answer.following.join(", ")} to follow`);
    message.textContent = [...parts, ...answer.warnings].join(" · ");
    if (approved) location.href = next === null ? `/${suffix}` : `/file/${next}${suffix}`;
  } catch (error) {
    message.textContent = error.message;
    message.className = "message error";
  }
}

function go(side) {
  const target = song?.view[side];
  if (target === null || target === undefined) return;
  if (dirty && !confirm("Leave without saving your changes?")) return;
  dirty = false;
  location.href = `/file/${target}${suffix}`;
}

function seek(seconds) {
  audio.currentTime = Math.min(Math.max(0, audio.currentTime + seconds), audio.duration || 0);
}

function movePlayhead() {
  const length = audio.duration || song?.duration;
  playhead.style.left = length ? `${(100 * audio.currentTime) / length}%` : "0";
  if (!audio.paused) requestAnimationFrame(movePlayhead);
}

form.addEventListener("input", edited);
form.addEventListener("submit", (event) => {
  event.preventDefault();
  save(true);
});
document.getElementById("save").addEventListener("click", () => save(false));
document.getElementById("previous").addEventListener("click", (event) => { event.preventDefault(); go("previous"); });
document.getElementById("next").addEventListener("click", (event) => { event.preventDefault(); go("next"); });
audio.addEventListener("play", movePlayhead);
audio.addEventListener("seeked", movePlayhead);
audio.addEventListener("timeupdate", movePlayhead);
audio.addEventListener("error", () => {
  message.textContent = "this browser cannot play the file's format; its labels can still be edited";
});
document.getElementById("picture").addEventListener("click", (event) => {
  const box = event.currentTarget.getBoundingClientRect();
  const length = audio.duration || song?.duration;
  if (length) audio.currentTime = ((event.clientX - box.left) / box.width) * length;
});
image.addEventListener("error", async () => {
  image.hidden = true;
  const answer = await fetch(image.src).then((r) => r.json()).catch(() => ({}));
  document.getElementById("image-message").textContent = answer.error || "no picture for this file";
});

document.addEventListener("keydown", (event) => {
  const command = event.ctrlKey || event.metaKey;
  if (command && event.key === "Enter") {
    event.preventDefault();
    save(true);
    return;
  }
  if (command && event.key.toLowerCase() === "s") {
    event.preventDefault();
    save(false);
    return;
  }
  const typing = event.target.closest && event.target.closest("input, textarea, select");
  if (typing) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (command || event.altKey || event.target === audio) return;
  const actions = {
    " ": () => (audio.paused ? audio.play() : audio.pause()),
    k: () => (audio.paused ? audio.play() : audio.pause()),
    ArrowLeft: () => seek(-5),
    j: () => seek(-5),
    ArrowRight: () => seek(5),
    l: () => seek(5),
    n: () => go("next"),
    p: () => go("previous"),
  };
  const action = actions[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
});
window.addEventListener("beforeunload", (event) => {
  if (dirty) event.preventDefault();
});

api(`/api/songs/${id}${suffix}`)
  .then((answer) => {
    fill(answer);
    audio.src = `/api/songs/${id}/audio`;
    image.src = `/api/songs/${id}/image`;
  })
  .catch((error) => {
    message.textContent = error.message;
    message.className = "message error";
  });
