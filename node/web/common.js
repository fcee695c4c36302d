// Shared helpers for the pacsnode pages: DICOM JSON values and QIDO calls. No build step.
"use strict";
const DICOMWEB = "/dicom-web";

function value(item, tag) {
  const attribute = item[tag];
  if (!attribute || !attribute.Value || attribute.Value.length === 0) return "";
  const first = attribute.Value[0];
  if (first === null) return "";
  if (typeof first === "object") return (first.Alphabetic || first.Ideographic || "").replace(/\^/g, " ").trim();
  return attribute.Value.join(", ");
}

function formatDate(text) {
  return /^\d{8}$/.test(text) ? `${text.slice(0, 4)}-${text.slice(4, 6)}-${text.slice(6, 8)}` : text;
}

async function qido(path, params) {
  const url = new URL(DICOMWEB + path, window.location.origin);
  for (const [key, val] of Object.entries(params || {})) {
    if (val !== "" && val !== undefined && val !== null) url.searchParams.append(key, val);
  }
  const reply = await fetch(url, { headers: { Accept: "application/dicom+json" } });
  const warning = reply.headers.get("Warning") || "";
  if (reply.status === 503) return { rows: [], warning: warning || "service unavailable" };
  if (!reply.ok) throw new Error(`${reply.status} ${await reply.text()}`);
  return { rows: await reply.json(), warning };
}

function cell(row, text, href) {
  const td = document.createElement("td");
  if (href) {
    const link = document.createElement("a");
    link.href = href;
    link.textContent = text;
    td.appendChild(link);
  } else {
    td.textContent = text;
  }
  row.appendChild(td);
  return td;
}

function notice(element, text, kind) {
  element.textContent = text;
  element.className = text ? kind : "";
  element.hidden = !text;
}

function bytes(value) {
  if (value === null || value === undefined) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let index = 0;
  while (value >= 1000 && index < units.length - 1) { value /= 1000; index += 1; }
  return index === 0 ? `${value} B` : `${value.toFixed(1)} ${units[index]}`;
}
