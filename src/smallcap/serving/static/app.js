// The smallcap web page: pick or drop files (or a sample), caption them through POST /v1/captions.
"use strict";

const $ = (id) => document.getElementById(id);
let chosen = [];  // [{name, blob, url}]

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setFiles(files) {
  chosen = files.map((f) => ({ name: f.name, blob: f, url: URL.createObjectURL(f) }));
  $("run").disabled = chosen.length === 0;
  $("status").textContent = chosen.length ? `${chosen.length} file(s) ready: ${chosen.map((c) => c.name).join(", ")}` : "";
  showError("");
}

function selectedStores() {
  const names = [...document.querySelectorAll("#stores input:checked")].map((box) => box.value);
  return names.length ? names : ["none"];
}

async function caption(stores) {
  const form = new FormData();
  for (const item of chosen) form.append("files", item.blob, item.name);
  for (const name of stores) form.append("datastores", name);
  if ($("k").value) form.append("k", $("k").value);
  if ($("beams").value) form.append("num_beams", $("beams").value);
  const response = await fetch("/v1/captions", { method: "POST", body: form });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail ? `${response.status}: ${JSON.stringify(body.detail)}` : `HTTP ${response.status}`);
  return body.results;
}

function column(result, title) {
  const div = document.createElement("div");
  div.className = "column";
  if (title) div.append(Object.assign(document.createElement("h3"), { textContent: title }));
  if (result.error) {
    div.append(Object.assign(document.createElement("p"), { className: "input-error", textContent: result.error }));
    return div;
  }
  div.append(Object.assign(document.createElement("p"), { className: "caption", textContent: result.caption }));
  if (result.retrieved.length) {
    const list = document.createElement("ol");
    list.className = "retrieved";
    for (const hit of result.retrieved) {
      const item = document.createElement("li");
      item.append(Object.assign(document.createElement("span"), { className: "score", textContent: hit.score.toFixed(3) + " " }),
                  document.createTextNode(hit.caption));
      list.append(item);
    }
    div.append(Object.assign(document.createElement("p"), { textContent: "Retrieved captions (similarity):" }), list);
  } else {
    div.append(Object.assign(document.createElement("p"), { textContent: "No retrieval." }));
  }
  const t = result.timings_ms;
  div.append(Object.assign(document.createElement("p"), { className: "timings", textContent:
    `queue ${t.queue.toFixed(0)} ms, encode ${t.encode.toFixed(0)} ms, retrieve ${t.retrieve.toFixed(0)} ms, ` +
    `decode ${t.decode.toFixed(0)} ms, total ${t.total.toFixed(0)} ms` }));
  return div;
}

async function run() {
  showError("");
  $("run").disabled = true;
  $("status").textContent = "Captioning…";
  const compare = $("compare").checked;
  const storeSets = compare ? [[$("left-store").value], [$("right-store").value]] : [selectedStores()];
  try {
    const answers = await Promise.all(storeSets.map(caption));
    const results = $("results");
    results.replaceChildren();
    chosen.forEach((item, index) => {
      const card = document.createElement("div");
      card.className = "card";
      card.dataset.input = item.name;
      const preview = item.blob.type.startsWith("video/") ? document.createElement("video") : document.createElement("img");
      preview.src = item.url;
      preview.alt = item.name;
      const columns = document.createElement("div");
      columns.className = "columns";
      answers.forEach((answer, which) => columns.append(column(answer[index], compare ? storeSets[which].join(" + ") : item.name)));
      card.append(preview, columns);
      results.append(card);
    });
    $("status").textContent = "Done.";
  } catch (error) {
    $("status").textContent = "";
    showError(error.message);
  } finally {
    $("run").disabled = chosen.length === 0;
  }
}

async function init() {
  try {
    const [stores, samples] = await Promise.all([fetch("/v1/datastores"), fetch("/v1/samples")]);
    if (!stores.ok) throw new Error("the server is still loading the model; reload in a few seconds");
    for (const store of (await stores.json()).datastores) {
      const label = document.createElement("label");
      const box = Object.assign(document.createElement("input"), { type: "checkbox", value: store.name, checked: store.default });
      label.append(box, ` ${store.name} (${store.size} captions) `);
      $("stores").append(label);
      for (const select of [$("left-store"), $("right-store")]) select.append(new Option(store.name, store.name));
    }
    for (const select of [$("left-store"), $("right-store")]) select.append(new Option("none", "none"));
    if ($("right-store").options.length > 1) $("right-store").selectedIndex = 1;
    for (const name of (await samples.json()).samples) {
      const img = Object.assign(document.createElement("img"), { src: `/samples/${name}`, alt: name, title: name });
      img.addEventListener("click", async () => {
        const blob = await (await fetch(img.src)).blob();
        setFiles([new File([blob], name, { type: blob.type })]);
        run();
      });
      $("samples").append(img);
    }
  } catch (error) {
    showError(error.message);
  }
}

$("files").addEventListener("change", (event) => setFiles([...event.target.files]));
$("run").addEventListener("click", run);
$("compare").addEventListener("change", () => { $("compare-stores").hidden = !$("compare").checked; });
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  setFiles([...event.dataTransfer.files]);
});
init();
