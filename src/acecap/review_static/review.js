// Shared by both pages: talking to the server and formatting values.
"use strict";

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function confidence(value) {
  return value === null || value === undefined ? "" : value.toFixed(2);
}

// The table's view (filters, order, page) travels in the query string between the two pages.
const VIEW_KEYS = ["q", "status", "flag", "below", "sort", "desc"];

function viewOf(params) {
  const view = new URLSearchParams();
  for (const key of VIEW_KEYS) if (params.get(key)) view.set(key, params.get(key));
  return view;
}

function element(tag, attributes = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}
