// The playground: plain JavaScript against the bridge's own API, the way an app would use it.
"use strict";

const $ = id => document.getElementById(id);
const clientId = "playground-" + crypto.randomUUID();
let chosen = null;

function headers() {
  const key = $("key").value.trim();
  return key ? {"X-API-Key": key} : {};
}

async function call(path, options = {}) {
  const resp = await fetch(path, {...options, headers: {...headers(), ...(options.headers || {})}});
  const body = resp.headers.get("Content-Type")?.includes("json") ? await resp.json() : null;
  if (!resp.ok) throw new Error(body?.detail || `HTTP ${resp.status}`);
  return body;
}

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function progress(percent) {
  $("bar").style.width = percent + "%";
  document.querySelector(".progress").setAttribute("aria-valuenow", String(percent));
}

async function loadCatalogue() {
  const list = $("catalogue");
  try {
    const workflows = await call("workflow-list?detail=1");
    list.replaceChildren(...workflows.map(entry => {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.workflow = entry.name;
      button.setAttribute("aria-pressed", "false");
      const picture = document.createElement(entry.thumbnail ? "img" : "span");
      picture.className = "thumb";
      const key = $("key").value.trim();
      if (entry.thumbnail) {
        picture.alt = "";
        // The link as the bridge gives it (with --root-path, under a proxy's path); one that is not
        // under this page's folder is taken from there (a proxy's path the bridge was not told of).
        const base = new URL(".", location.href).pathname;
        const link = entry.thumbnail.startsWith(base) ? entry.thumbnail : entry.thumbnail.replace(/^\//, "");
        picture.src = link + (key ? "&token=" + encodeURIComponent(key) : "");
      }
      const text = document.createElement("span");
      text.textContent = entry.name;
      const small = document.createElement("small");
      small.textContent = entry.description || "";
      text.append(small);
      button.append(picture, text);
      button.addEventListener("click", () => choose(entry, button));
      return button;
    }));
  } catch (error) {
    list.textContent = "Cannot list workflows: " + error.message;
  }
}

function field(key, spec) {
  const label = document.createElement("label");
  label.textContent = `${key} (${spec.title || spec.class})`;
  let input;
  if (spec.choices) {
    input = document.createElement("select");
    for (const choice of spec.choices) input.append(new Option(String(choice), String(choice)));
  } else if (spec.upload) {
    input = document.createElement("input");
    input.type = "file";
    input.accept = spec.upload + "/*";
  } else if (spec.type === "bool") {
    input = document.createElement("input");
    input.type = "checkbox";
  } else if (spec.type === "int" || spec.type === "float") {
    input = document.createElement("input");
    input.type = "number";
    input.step = spec.type === "int" ? "1" : "any";
    if (spec.min !== undefined) input.min = spec.min;
    if (spec.max !== undefined) input.max = spec.max;
  } else {
    input = document.createElement(String(spec.default || "").length > 40 ? "textarea" : "input");
  }
  input.name = key;
  if (input.type === "checkbox") input.checked = Boolean(spec.default);
  else if (input.type !== "file" && spec.default !== undefined && spec.default !== null) input.value = spec.default;
  label.append(input);
  return label;
}

async function choose(entry, button) {
  for (const other of document.querySelectorAll("#catalogue button")) other.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-pressed", "true");
  chosen = entry;
  $("title").textContent = entry.name;
  $("description").textContent = entry.description || "";
  $("form").replaceChildren(...Object.entries(entry.inputs).map(([key, spec]) => field(key, spec)));
  $("results").replaceChildren();
  progress(0);
  say("");
  $("run").hidden = false;
}

function valueOf(input, spec) {
  if (input.type === "checkbox") return input.checked;
  if (spec.type === "int") return parseInt(input.value, 10);
  if (spec.type === "float") return parseFloat(input.value);
  return input.value;
}

async function generate() {
  if (!chosen) return;
  $("generate").disabled = true;
  $("results").replaceChildren();
  progress(0);
  try {
    const body = {workflow: chosen.name};
    const files = new FormData();
    for (const input of $("form").elements) {
      const spec = chosen.inputs[input.name];
      if (!spec) continue;
      if (input.type === "file") {
        if (input.files.length) files.append(input.name, input.files[0], input.files[0].name);
      } else {
        body[input.name] = valueOf(input, spec);
      }
    }
    if ([...files.keys()].length) {
      say("Uploading…");
      Object.assign(body, await call(`upload?clientId=${encodeURIComponent(clientId)}`, {method: "POST", body: files}));
    }
    const ended = listen();
    const answer = await call(`generate-based-workflow?clientId=${encodeURIComponent(clientId)}`, {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    say(answer.detail);
    const last = await ended;
    if (last.status === "error") throw new Error(last.detail);
    progress(100);
    say(last.detail);
    await showResults();
  } catch (error) {
    say(error.message, true);
  } finally {
    $("generate").disabled = false;
  }
}

function listen() {
  // The socket is opened before the job is generated, so no frame is missed.
  return new Promise((resolve, reject) => {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("clientId", clientId);
    const key = $("key").value.trim();
    if (key) url.searchParams.set("token", key);
    const socket = new WebSocket(url);
    socket.onmessage = event => {
      const frame = JSON.parse(event.data);
      if (frame.status === "progress") {
        progress(parseFloat(frame.detail));
        say(frame.detail);
      } else if (frame.status === "listening" && frame.job_id) {
        say(frame.detail);
      } else if ((frame.status === "closed" || frame.status === "error") && frame.job_id) {
        socket.close();
        resolve(frame);
      }
    };
    socket.onerror = () => reject(new Error("the socket failed"));
  });
}

async function showResults() {
  const answer = await call(`history?clientId=${encodeURIComponent(clientId)}&resType=base64`);
  $("results").replaceChildren(...(answer?.files || []).map(file => {
    if (!file.content_type.startsWith("image/")) {
      const link = document.createElement("a");
      link.href = `data:${file.content_type};base64,${file.content}`;
      link.download = file.file_name;
      link.textContent = file.file_name;
      return link;
    }
    const picture = document.createElement("img");
    picture.src = `data:${file.content_type};base64,${file.content}`;
    picture.alt = file.file_name;
    picture.title = file.file_name;
    return picture;
  }));
}

$("generate").addEventListener("click", generate);
$("key").addEventListener("change", loadCatalogue);
loadCatalogue();
