// The page at "/": choose, drop or paste an image, see the top-k labels and where the crops of
// the chosen TTA policy fall, and a summary of the model card. Plain DOM, nothing fetched from
// anywhere but this server.
"use strict";

const config = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
let current = null; // the chosen image file
let generation = 0; // answers to superseded requests are dropped

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function policy() {
  const checked = document.querySelector('input[name="tta"]:checked');
  return checked ? checked.value : config.default;
}

// A failed request, in words for a person, from its HTTP status (0: no answer at all) and the
// server's message; the server's message stays beside them, since it names the limit or the format.
class Failure extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }

  get words() {
    const { status, message } = this;
    if (status === 0) return "The server could not be reached. Check the connection and try again.";
    if (status === 400 && /empty \(0 bytes\)/.test(message)) return "This file is empty. Choose an image.";
    if (status === 400 && /not a recognised image/.test(message)) return "This file is not an image. Try a JPEG or PNG.";
    if (status === 400 && /aspect ratio/.test(message)) return "This image is too long and thin to classify. Crop it and try again.";
    if (status === 400 && /damaged|invalid|truncated/.test(message)) return "This image is damaged or incomplete. Try saving it again, or another image.";
    if (status === 408) return "The upload took too long. Check the connection and try again.";
    if (status === 413) return "This image is too large for this server. Try a smaller one.";
    if (status === 415) return "This kind of image is not accepted here. Try a JPEG or PNG.";
    if (status === 503) return `The server is busy. Try again ${this.retryAfter ? `in ${this.retryAfter} s` : "in a moment"}.`;
    if (status >= 500) return "The server could not answer. Try again later.";
    return "The server did not accept this request.";
  }

  get detail() {
    const retry = this.retryAfter ? `, retry after ${this.retryAfter} s` : "";
    return this.status ? `The server said: ${this.message} (HTTP ${this.status}${retry})` : `The browser said: ${this.message}`;
  }
}

// A failure's words and, below them, the server's own, into node.
function sayFailure(node, failure, lead = "") {
  node.replaceChildren(`${lead}${failure.words}`, el("span", { class: "detail" }, failure.detail));
}

function showError(failure) {
  if (failure) sayFailure($("error"), failure);
  else $("error").replaceChildren();
  $("error").hidden = !failure;
  if (failure) reveal($("error"), $("error"));
}

// Bring what just arrived into view when it is not (on a phone the answer is below the
// choices): its start at the top of the screen, unless it is already visible down to last.
function reveal(node, last) {
  const top = node.getBoundingClientRect().top, bottom = last.getBoundingClientRect().bottom;
  if (top >= 0 && bottom <= window.innerHeight) return;
  const still = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  node.scrollIntoView({ block: "start", behavior: still ? "auto" : "smooth" });
}

// --- TTA choice ----------------------------------------------------------------------------

function buildPolicies() {
  for (const p of config.policies) {
    const input = el("input", { type: "radio", name: "tta", value: p.name, id: `tta-${p.name}` });
    input.checked = p.name === config.default;
    input.addEventListener("change", () => { describePolicy(); if (current) classify(current); });
    // The API's own names, so what a person sees here is what `-F tta=...` takes.
    $("tta-options").append(el("label", { for: `tta-${p.name}` }, input, el("span", {}, p.name)));
  }
  describePolicy();
}

function describePolicy() {
  const p = config.policies.find((q) => q.name === policy());
  const times = p.crops === 1 ? "one model call" : `${p.crops} model calls`;
  const isDefault = p.name === config.default ? " This model's default." : "";
  $("tta-help").textContent = `Resize the shortest edge to ${p.resize} px, then ${p.about} (${times} per image).`
    + `${isDefault} In the API: tta=${p.name}.`;
}

// --- classify ------------------------------------------------------------------------------

// POST a form; the JSON answer, or a Failure with the API's message, its status and Retry-After
// (a body that is not JSON, e.g. from a proxy, is kept as its text; no answer at all is status 0).
async function post(path, form) {
  let response, text;
  try {
    response = await fetch(config.prefix + path, { method: "POST", body: form });
    text = await response.text();
  } catch (e) {
    throw new Failure(0, e.message);
  }
  let answer;
  try { answer = JSON.parse(text); } catch { answer = { error: text || response.statusText }; }
  if (!response.ok) {
    throw new Failure(response.status, answer.error || response.statusText, response.headers.get("Retry-After"));
  }
  return answer;
}

async function classify(file) {
  const mine = ++generation;
  const tta = policy();
  showError(null);
  $("status").textContent = `Classifying (tta ${tta}) ...`;
  const form = new FormData();
  form.append("image", file, file.name || "pasted-image");
  form.append("tta", tta);
  form.append("top_k", String(config.top_k));
  if ($("fallback").checked) {
    form.append("tta_fallback", "true");
    // a late answer rather than a refusal, whatever the server's default: what the choice says
    form.append("tta_budget_strict", "false");
  }
  let answer;
  try {
    answer = await post("/classify", form);
  } catch (e) {
    if (mine !== generation) return;
    // nothing of an earlier answer stays under the error: its scores, its accuracy, its crops
    $("status").textContent = "";
    $("results").replaceChildren();
    $("ood").hidden = true;
    $("served").hidden = true;
    $("boxes").replaceChildren();
    showError(e instanceof Failure ? e : new Failure(0, String(e)));
    return;
  }
  if (mine !== generation) return;
  showResults(answer);
  drawCrops(answer.tta);
  explainImage(current);
}

// What the answer can be expected to get right: the card's validation accuracy of the policy
// that ran, and, when the server served a cheaper one than asked (tta_fallback), what that cost.
// Not for an image unlike the training images: the validation accuracy says nothing about it.
function showServed(answer, unlike) {
  const accuracy = (name) => {
    const p = config.policies.find((q) => q.name === name);
    return p && typeof p.accuracy === "number" ? `${(100 * p.accuracy).toFixed(2)} %` : null;
  };
  const served = unlike ? null : accuracy(answer.tta);
  const asked = answer.requested_tta || answer.tta;
  const degraded = asked !== answer.tta;
  $("served").classList.toggle("degraded", degraded);
  if (degraded) {
    const cost = served && accuracy(asked) ? ` Expected accuracy ${served} instead of ${accuracy(asked)}.` : "";
    $("served").textContent = `The server was busy: answered with ${answer.tta} instead of ${asked}.${cost}`;
  } else {
    $("served").textContent = served ? `Expected accuracy with ${answer.tta}: ${served} (validation images).` : "";
  }
  $("served").hidden = !$("served").textContent;
}

function showResults(answer) {
  const ood = answer.ood;
  const unlike = Boolean(ood && ood.out_of_distribution);
  $("status").textContent = `${answer.model}, tta ${answer.tta}`;
  // first, above the scores: they are a guess for this image
  $("ood").hidden = !unlike;
  if (unlike) {
    $("ood").textContent = `This image does not look like the training images (distance ${ood.distance}, `
      + `threshold ${ood.threshold.toFixed(2)}): the labels below are a guess outside what the model was `
      + "measured on, and its measured accuracy does not apply.";
  }
  showServed(answer, unlike);
  $("results").replaceChildren(...answer.predictions.map((p) => {
    const percent = (100 * p.score).toFixed(1);
    return el("li", { "data-label": p.label, "data-score": String(p.score) },
      el("div", { class: "row" }, el("span", { class: "label" }, p.label), el("span", {}, `${percent} %`)),
      el("div", { class: "bar" }, el("span", { style: `width: ${percent}%` })));
  }));
  // from the line that names the model and the policy that ran
  reveal($("status"), $("results").firstElementChild || $("answer"));
}

async function drawCrops(tta) {
  const img = $("preview");
  if (!img.complete || !img.naturalWidth) await new Promise((ok) => img.addEventListener("load", ok, { once: true }));
  const W = img.naturalWidth, H = img.naturalHeight;
  img.classList.toggle("small", Math.max(W, H) < 160); // upscaled: show pixels, not blur
  const response = await fetch(`${config.prefix}/crops?width=${W}&height=${H}&tta=${encodeURIComponent(tta)}`);
  if (!response.ok) return; // the boxes are an illustration; the answer is already shown
  const { windows } = await response.json();
  const pct = (v, total) => `${(100 * v / total).toFixed(3)}%`;
  // a lone crop needs no number
  const badge = (w, i) => (windows.length > 1
    ? [el("b", { style: badgePlace(w, W, H) }, w.mirrored ? `${i + 1}↔` : String(i + 1))] : []);
  $("boxes").replaceChildren(...windows.map((w, i) => el("div", {
    class: w.mirrored ? "box mirrored" : "box",
    title: `crop ${i + 1}${w.mirrored ? ", mirrored" : ""}`,
    style: `left:${pct(w.left, W)};top:${pct(w.top, H)};width:${pct(w.width, W)};height:${pct(w.height, H)}`,
  }, ...badge(w, i))));
}

// Where a crop's number sits: in the corner of its window that points away from the image's
// middle (a corner crop's badge in that corner of the image, the center crop's in the middle),
// so the badges spread out as the windows do. A mirrored crop has the same window as a plain
// one: its badge sits beside that one's, toward the middle, instead of on top of it.
function badgePlace(w, W, H) {
  const side = (start, size, total) => {
    const middle = start + size / 2;
    return middle < total * 0.49 ? "start" : middle > total * 0.51 ? "end" : "mid";
  };
  const h = side(w.left, w.width, W), v = side(w.top, w.height, H);
  const x = { start: "left:2px", end: "right:2px", mid: "left:50%" }[h];
  const y = { start: "top:2px", end: "bottom:2px", mid: "top:50%" }[v];
  const shift = { start: [0, 110], end: [0, -110], mid: [-105, 5] }[h][w.mirrored ? 1 : 0];
  return `${x};${y};transform:translate(${shift}%, ${v === "mid" ? -50 : 0}%)`;
}

// --- choosing an image ---------------------------------------------------------------------

function choose(file) {
  if (!file) return;
  current = file;
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  $("boxes").replaceChildren();
  hideHeat(); // the old image's map
  $("frame").hidden = true; // until the image has loaded: never a broken-image icon
  $("view").hidden = false;
  img.src = URL.createObjectURL(file);
  classify(file);
}

function wireInputs() {
  // A file the server reads but this browser cannot show (TIFF) gets its answer without a picture.
  $("preview").addEventListener("load", () => { $("frame").hidden = false; });
  $("preview").addEventListener("error", () => { $("frame").hidden = true; });
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); choose(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) choose(item.getAsFile());
  });
}

// --- the model card ------------------------------------------------------------------------

function percent(value) {
  return typeof value === "number" ? `${(100 * value).toFixed(2)} %` : null;
}

function summarize(card) {
  const m = card.metrics || {};
  const accuracy = [["none", m.accuracy], ["flip", m.accuracy_flip], ["five_crop", m.accuracy_five_crop],
    ["ten_crop", m.accuracy_ten_crop], ["fastai TTA", m.accuracy_fastai_tta]]
    .filter(([, v]) => typeof v === "number").map(([name, v]) => `${name} ${percent(v)}`).join(" · ");
  const parity = card.parity;
  const norm = card.normalization;
  const pre = card.preprocess;
  const rows = [
    ["Model", `${card.name} (version ${card.version})`],
    ["Labels", `${card.labels.length}: ${card.labels.slice(0, 30).join(", ")}${card.labels.length > 30 ? " …" : ""}`],
    ["Input", `${card.input.width}×${card.input.height} ${card.input.channels}, ${card.input.dtype}`],
    ["Preprocessing", `${pre.exif_transpose ? "EXIF orientation, " : ""}shortest edge to ${pre.resize_shortest_edge} px (${pre.interpolation}), ${pre.crop} crop`],
    ["Normalization", `mean [${norm.mean.map((v) => v.toFixed(3)).join(", ")}], std [${norm.std.map((v) => v.toFixed(3)).join(", ")}]${norm.in_graph ? ", inside the model" : ""}`],
    ["Accuracy", accuracy ? `${accuracy}${m.valid_count ? ` (${m.valid_count} validation images)` : ""}` : "not recorded"],
    ["Parity", parity ? `top-1 agreement ${percent(parity.top1_agreement)}, max |Δp| ${Number(parity.max_abs_diff).toExponential(1)} vs ${parity.reference || "the training framework"}${parity.passed === false ? " (FAILED)" : ""}` : "not recorded"],
    ["Default TTA", card.tta.default],
    ["Intended use", card.intended_use],
    ["License", card.license],
  ].filter(([, v]) => v);
  $("card-summary").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

// Where the server serves several models: a list to pick one, whose page is the same at
// /models/{name}/ (its own policies and card; its requests go to its routes).
function pickModel() {
  const pick = $("model-pick");
  if (config.models.length < 2) return;
  pick.replaceChildren(...config.models.map((name) => el("option", { value: name }, name)));
  pick.value = config.name;
  pick.hidden = false;
  pick.addEventListener("change", () => { window.location.href = `/models/${encodeURIComponent(pick.value)}/`; });
  for (const a of document.querySelectorAll("a[href='/card']")) a.href = `${config.prefix}/card`;
}

async function loadCard() {
  $("model-tag").textContent = config.model;
  pickModel();
  try {
    const response = await fetch(config.prefix + "/card");
    if (!response.ok) throw new Error((await response.json()).error || response.statusText);
    summarize(await response.json());
  } catch (e) {
    $("card-summary").replaceChildren(el("dd", {}, `The card could not be read: ${e.message}`));
  }
}

// --- what the model looked at ---------------------------------------------------------------
// With the toggle on, each new image's occlusion map (POST /explain) is drawn over its plain
// crop, on the server's colour scale (config.heat: dark = covering the cell changes nothing,
// bright = the largest drop of the label's score).

let heatFile = null; // the file whose map is drawn or asked for

// A cell's colour, as sota_serve/explain/heatmap.py blends it: the more the score drops, the brighter
// and the more opaque, so the picture shows through where covering changes nothing.
function heatColour(t, alpha = 1) {
  const stops = config.heat.stops;
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
  const rgb = stops[i].map((v, c) => Math.round(v * (1 - f) + stops[i + 1][c] * f));
  return `rgba(${rgb.join(",")},${alpha})`;
}

// The map or the crop outlines, never both: outlines and numbers over the map's cells make
// either unreadable, most of all on a phone's small picture.
function showHeat(on) {
  $("heat").hidden = !on;
  $("heat-note").hidden = !on;
  $("boxes").hidden = on;
}

function hideHeat() {
  showHeat(false);
  $("heat-legend").hidden = true;
  heatFile = null;
}

async function explainImage(file) {
  if (!$("explain").checked || !file || heatFile === file) return;
  heatFile = file;
  showHeat(false);
  $("heat-legend").hidden = false;
  $("heat-status").textContent = "Covering each part of the crop in turn ...";
  $("heat-top").textContent = "";
  const form = new FormData();
  form.append("image", file, file.name || "pasted-image");
  let answer;
  try {
    answer = await post("/explain", form);
  } catch (e) {
    if (heatFile === file) sayFailure($("heat-status"), e instanceof Failure ? e : new Failure(0, String(e)), "No map. ");
    return;
  }
  if (heatFile !== file) return; // another image was chosen meanwhile
  await drawHeat(answer);
}

async function drawHeat(answer) {
  const img = $("preview");
  if (!img.complete || !img.naturalWidth) await new Promise((ok) => img.addEventListener("load", ok, { once: true }));
  const W = img.naturalWidth, H = img.naturalHeight, n = answer.grid.length;
  const top = Math.max(...answer.grid.flat(), 1e-6);
  const canvas = $("heat");
  canvas.width = n;
  canvas.height = n;
  const ctx = canvas.getContext("2d");
  answer.grid.forEach((row, i) => row.forEach((v, j) => {
    const t = Math.min(Math.max(v / top, 0), 1);
    ctx.fillStyle = heatColour(t, config.heat.alpha * t);
    ctx.fillRect(j, i, 1, 1);
  }));
  const w = answer.window, pct = (v, total) => `${(100 * v / total).toFixed(3)}%`;
  canvas.style.cssText = `left:${pct(w.left, W)};top:${pct(w.top, H)};width:${pct(w.width, W)};height:${pct(w.height, H)}`;
  canvas.dataset.label = answer.label;
  canvas.title = `where covering the image lowers the score of ${answer.label}`;
  showHeat(true);
  $("heat-status").textContent = `Lower score of ${answer.label} when that part of the center crop is covered`
    + ` (${n}×${n} cells, ${n * n + 1} model calls).`;
  $("heat-ramp").style.background = `linear-gradient(to right, ${config.heat.stops.map((_, i) => heatColour(i / (config.heat.stops.length - 1))).join(", ")})`;
  $("heat-top").textContent = `score ${top.toPrecision(2)} lower`;
}

function wireExplain() {
  $("explain").addEventListener("change", () => { if ($("explain").checked) explainImage(current); else hideHeat(); });
}

buildPolicies();
wireInputs();
loadCard();
wireExplain();
