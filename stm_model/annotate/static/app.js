// stm annotate: the page. Plain JavaScript, no build step; it talks to server.py's JSON API.
//
// The page holds what is drawn but not yet sent (this round's strokes, also kept in the
// browser's localStorage so a reload keeps them); the server holds everything else (the
// rounds, their scribbles, the masks), so a reload shows the session as it is.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("frame-canvas");
const context = canvas.getContext("2d");
const scratch = document.createElement("canvas").getContext("2d", {willReadFrequently: true});

const PLAY_FPS = 12;
const ERASER_RADIUS = 10;      // display pixels
const POLL_MS = 250;
const BITMAP_OPTIONS = {colorSpaceConversion: "none", premultiplyAlpha: "none"};  // exact colours
const MASK_ALPHA = 140;        // of 255: the mask over the frame

const page = {
  session: null,      // GET /api/session
  frames: [],         // ImageBitmap per frame, decoded once
  masks: [],          // ImageBitmap per frame: the palette PNG of the shown masks
  overlays: [],       // ImageBitmap per frame: the masks coloured, background transparent
  masksVersion: -1,   // the server's masks_version of what is loaded
  current: 0,
  brush: 1,           // the object id drawn (0: background, the negative scribbles)
  erasing: false,
  showMasks: true,
  committed: [],      // per frame: the strokes of the finished rounds (from the server)
  pending: [],        // per frame: this round's strokes, not yet sent
  actions: [],        // the undo stack: {kind: "add" | "erase", frame, stroke, index}
  drawing: null,      // {stroke} or {erase: true} while the mouse button is down
  sentRound: 0,       // the round whose strokes are on the server, running
  player: null,
  started: performance.now(),
  switchTimes: [],    // ms from a frame-change event to the drawn frame (the benchmark reads them)
};
window.stmAnnotate = page;  // for tests and the benchmark: page state and maskLabels(t)

// ------------------------------------------------------------------------------ the server

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(payload.error || `${response.status} ${response.statusText}`);
  return payload;
}

async function bitmap(url) {
  const response = await fetch(url);
  if (!response.ok) {
    const payload = await response.json().catch(() => ({}));
    throw new Error(payload.error || `could not load ${url}`);
  }
  return createImageBitmap(await response.blob(), BITMAP_OPTIONS);
}

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
  clearTimeout(showMessage.timer);
  if (kind !== "error") showMessage.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

$("message").addEventListener("click", () => { $("message").hidden = true; });

// ------------------------------------------------------------------------------ drawing

function colour(objectId, alpha = 1) {
  if (objectId === 0) return `rgba(255, 255, 255, ${alpha})`;  // palette 0 is black: unseen
  const [r, g, b] = page.session.palette[objectId];
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}

function strokeWidth() {
  return Math.max(2, Math.round(canvas.width / 240));
}

function drawStrokes(strokes, alpha) {
  const w = canvas.width - 1, h = canvas.height - 1;
  context.lineCap = context.lineJoin = "round";
  const width = strokeWidth();
  for (const stroke of strokes) {
    context.beginPath();
    stroke.path.forEach(([x, y], i) => {
      if (i === 0) context.moveTo(x * w, y * h); else context.lineTo(x * w, y * h);
    });
    if (stroke.path.length === 1) context.lineTo(stroke.path[0][0] * w + 0.5, stroke.path[0][1] * h);
    // An edge that stands out over the mask of its own colour: light around the (dark) palette
    // colours, dark around the background's white.
    context.lineWidth = width + 2;
    context.strokeStyle = stroke.object_id ? `rgba(255, 255, 255, ${alpha})`
      : `rgba(0, 0, 0, ${alpha * 0.7})`;
    context.stroke();
    context.lineWidth = width;
    context.strokeStyle = colour(stroke.object_id, alpha);
    context.stroke();
  }
}

function draw() {
  const t = page.current;
  if (page.frames[t]) context.drawImage(page.frames[t], 0, 0);
  if (page.showMasks && page.overlays[t]) context.drawImage(page.overlays[t], 0, 0);
  drawStrokes(page.committed[t] || [], 0.55);
  drawStrokes(page.pending[t] || [], 1);
  document.body.dataset.frame = String(t);
}

function showFrame(t, eventTime = performance.now()) {
  const count = page.session.num_frames;
  page.current = Math.max(0, Math.min(count - 1, t));
  $("slider").value = String(page.current);
  $("frame-label").textContent = `frame ${page.current} / ${count - 1}`;
  draw();
  requestAnimationFrame(() => {
    page.switchTimes.push(performance.now() - eventTime);
    if (page.switchTimes.length > 1000) page.switchTimes.shift();
  });
}

function togglePlay() {
  if (page.player !== null) {
    clearInterval(page.player);
    page.player = null;
    $("play").textContent = "▶";
    return;
  }
  $("play").textContent = "❚❚";
  page.player = setInterval(
    () => showFrame((page.current + 1) % page.session.num_frames), 1000 / PLAY_FPS);
}

// ------------------------------------------------------------------------------ scribbles

function point(event) {
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width;
  const y = (event.clientY - box.top) * canvas.height / box.height;
  const clamp = (v) => Math.round(Math.min(1, Math.max(0, v)) * 1e5) / 1e5;
  return [clamp(x / (canvas.width - 1)), clamp(y / (canvas.height - 1))];
}

function seconds() {
  return Math.round(performance.now() - page.started) / 1000;
}

function distanceToStroke([px, py], stroke) {
  const w = canvas.width - 1, h = canvas.height - 1;
  let best = Infinity;
  const path = stroke.path.map(([x, y]) => [x * w, y * h]);
  const [x0, y0] = [px * w, py * h];
  for (let i = 0; i < path.length; i++) {
    const [ax, ay] = path[i];
    const [bx, by] = path[Math.min(i + 1, path.length - 1)];
    const length2 = (bx - ax) ** 2 + (by - ay) ** 2;
    const s = length2 ? Math.max(0, Math.min(1, ((x0 - ax) * (bx - ax) + (y0 - ay) * (by - ay)) / length2)) : 0;
    best = Math.min(best, Math.hypot(x0 - ax - s * (bx - ax), y0 - ay - s * (by - ay)));
  }
  return best;
}

function eraseAt(p) {
  const strokes = page.pending[page.current];
  for (let index = strokes.length - 1; index >= 0; index--) {
    if (strokes[index].sent) continue;
    if (distanceToStroke(p, strokes[index]) <= ERASER_RADIUS) {
      const [stroke] = strokes.splice(index, 1);
      page.actions.push({kind: "erase", frame: page.current, stroke, index});
    }
  }
}

function undo() {
  const action = page.actions.pop();
  if (!action) return;
  const strokes = page.pending[action.frame];
  if (action.kind === "add") {
    const index = strokes.indexOf(action.stroke);
    if (index >= 0) strokes.splice(index, 1);
  } else {
    strokes.splice(Math.min(action.index, strokes.length), 0, action.stroke);
  }
  savePending();
  showFrame(action.frame);
}

canvas.addEventListener("pointerdown", (event) => {
  if (event.button !== 0 || !page.session) return;
  canvas.setPointerCapture(event.pointerId);
  const p = point(event);
  if (page.erasing) {
    page.drawing = {erase: true};
    eraseAt(p);
  } else {
    const stroke = {path: [p], object_id: page.brush, start_time: seconds(), end_time: seconds()};
    page.pending[page.current].push(stroke);
    page.actions.push({kind: "add", frame: page.current, stroke});
    page.drawing = {stroke};
  }
  draw();
});

canvas.addEventListener("pointermove", (event) => {
  if (!page.drawing) return;
  const p = point(event);
  if (page.drawing.erase) {
    eraseAt(p);
  } else {
    const path = page.drawing.stroke.path;
    const last = path[path.length - 1];
    if (last[0] === p[0] && last[1] === p[1]) return;
    path.push(p);
    page.drawing.stroke.end_time = seconds();
  }
  draw();
});

function endStroke() {
  if (!page.drawing) return;
  page.drawing = null;
  savePending();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

function storageKey() {
  return `stm-annotate:${page.session.video}:${page.session.num_frames}`;
}

function savePending() {
  try {
    localStorage.setItem(storageKey(), JSON.stringify(page.pending.map(
      (strokes) => strokes.filter((s) => !s.sent))));
  } catch (error) { /* storage full or disabled: the strokes live on in this tab */ }
}

function restorePending() {
  const count = page.session.num_frames;
  page.pending = Array.from({length: count}, () => []);
  try {
    const saved = JSON.parse(localStorage.getItem(storageKey()) || "null");
    if (Array.isArray(saved) && saved.length === count) {
      page.pending = saved.map((strokes) => strokes.filter(
        (s) => s.object_id <= page.session.num_objects));
    }
  } catch (error) { /* unreadable: start empty */ }
}

// ------------------------------------------------------------------------------ objects

function renderObjects() {
  const box = $("objects");
  box.replaceChildren();
  for (let id = 1; id <= page.session.num_objects + 1; id++) {
    const objectId = id === page.session.num_objects + 1 ? 0 : id;  // background last
    const button = document.createElement("button");
    button.dataset.object = String(objectId);
    button.setAttribute("role", "radio");
    button.title = objectId ? `object ${objectId} (key ${objectId})`
      : "background: where no object is (key 0)";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour(objectId);
    button.append(swatch, objectId ? `object ${objectId}` : "background");
    button.addEventListener("click", () => selectBrush(objectId));
    box.append(button);
  }
  selectBrush(Math.min(page.brush, page.session.num_objects));
}

function selectBrush(objectId) {
  if (objectId > page.session.num_objects) return;
  page.brush = objectId;
  page.erasing = false;
  for (const button of $("objects").children) {
    const active = Number(button.dataset.object) === objectId;
    button.classList.toggle("active", active);
    button.setAttribute("aria-checked", String(active));
  }
  $("eraser").classList.remove("active");
  canvas.classList.remove("erasing");
}

function toggleEraser() {
  page.erasing = !page.erasing;
  $("eraser").classList.toggle("active", page.erasing);
  canvas.classList.toggle("erasing", page.erasing);
  for (const button of $("objects").children) button.classList.toggle("active",
    !page.erasing && Number(button.dataset.object) === page.brush);
}

async function setObjects(count) {
  const before = page.session.num_objects;
  try {
    page.session = await api("/api/objects", {num_objects: count});
  } catch (error) {
    showMessage(error.message);
    return;
  }
  for (const strokes of page.pending) {  // a removed object's strokes go with it
    for (let i = strokes.length - 1; i >= 0; i--) {
      if (strokes[i].object_id > count) strokes.splice(i, 1);
    }
  }
  page.actions = page.actions.filter((action) => action.stroke.object_id <= count);
  const added = count > before;
  renderObjects();
  selectBrush(added ? count : Math.min(page.brush, count));
  savePending();
  draw();
}

// ------------------------------------------------------------------------------ rounds

function setBusy(busy) {
  document.body.dataset.busy = busy ? "1" : "0";
  $("segment").disabled = busy;
  $("cancel").disabled = !busy;
  $("export").disabled = busy || !page.session.has_masks;
  $("add-object").disabled = $("remove-object").disabled = busy;
}

function showProgress(progress) {
  const bar = $("progress-bar");
  bar.max = Math.max(1, progress.total);
  bar.value = progress.done;
  const what = progress.stage === "segmenting" ? `round ${progress.round}: segmenting`
    : progress.stage;
  $("progress").textContent = progress.running
    ? `${what}: ${progress.done} of ${progress.total} frames` : progress.stage === "done"
      ? `round ${page.session.rounds.length} done` : (progress.stage || "no round yet");
}

function renderHistory() {
  $("history").replaceChildren(...page.session.rounds.map((round) => {
    const item = document.createElement("li");
    const frames = round.annotated_frames;
    item.textContent = `${frames.length === 1 ? "frame" : "frames"} ${frames.join(", ")}, ` +
      `${round.seconds.toFixed(1)} s`;
    const jump = document.createElement("button");
    jump.textContent = "go";
    jump.title = `show frame ${round.annotated_frames[0]}`;
    jump.addEventListener("click", () => showFrame(round.annotated_frames[0]));
    item.append(" ", jump);
    return item;
  }));
}

async function segment() {
  const strokes = page.pending.map((list) => list.filter((s) => !s.sent));
  if (!strokes.some((list) => list.length)) {
    showMessage("draw a scribble on a frame first: on an object with its colour, or background");
    return;
  }
  const scribbles = strokes.map((list) => list.map(({path, object_id, start_time, end_time}) =>
    ({path, object_id, start_time, end_time})));
  let reply;
  try {
    reply = await api("/api/round", {sequence: page.session.video, scribbles});
  } catch (error) {
    showMessage(error.message);
    return;
  }
  strokes.forEach((list) => list.forEach((stroke) => { stroke.sent = reply.round; }));
  page.sentRound = reply.round;
  $("message").hidden = true;
  await follow();
}

async function cancel() {
  try {
    await api("/api/cancel", {});
  } catch (error) {
    showMessage(error.message);
  }
}

async function follow() {
  // Poll the progress of the worker (a round, or the replay of a continued session).
  setBusy(true);
  let progress;
  for (;;) {
    try {
      progress = await api("/api/progress");
    } catch (error) {
      showMessage(`the server does not answer (${error.message}); is stm annotate running?`);
      await new Promise((resolve) => setTimeout(resolve, 2000));
      continue;
    }
    showProgress(progress);
    if (!progress.running) break;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
  const round = page.sentRound;
  page.sentRound = 0;
  await refreshSession();
  const succeeded = progress.stage === "done" && !progress.error;
  for (const list of page.pending) {
    for (let i = list.length - 1; i >= 0; i--) {
      if (list[i].sent !== round || !round) continue;
      if (succeeded) list.splice(i, 1); else delete list[i].sent;
    }
  }
  if (succeeded) page.actions = page.actions.filter((a) => page.pending[a.frame].includes(a.stroke));
  savePending();
  if (progress.error) showMessage(`the round failed: ${progress.error}`);
  else if (progress.stage === "cancelled") showMessage("round cancelled: its strokes are kept", "info");
  await loadMasks();
  setBusy(false);
  showProgress(progress);
}

async function refreshSession() {
  page.session = await api("/api/session");
  page.committed = page.session.scribbles.scribbles;
  renderHistory();
}

async function loadMasks() {
  const version = page.session.masks_version;
  if (!page.session.has_masks || version === page.masksVersion) return;
  const count = page.session.num_frames;
  const masks = new Array(count), overlays = new Array(count);
  let done = 0;
  $("progress").textContent = "loading masks";
  await Promise.all(Array.from({length: count}, async (_, t) => {
    masks[t] = await bitmap(`/api/masks/${t}.png?v=${version}`);
    overlays[t] = await overlay(masks[t]);
    done += 1;
    if (done % 10 === 0) $("progress").textContent = `loading masks: ${done} of ${count}`;
  }));
  page.masks = masks;
  page.overlays = overlays;
  page.masksVersion = version;
  document.body.dataset.round = String(page.session.rounds.length);
  draw();
}

function pixels(image) {
  scratch.canvas.width = image.width;
  scratch.canvas.height = image.height;
  scratch.clearRect(0, 0, image.width, image.height);
  scratch.drawImage(image, 0, 0);
  return scratch.getImageData(0, 0, image.width, image.height);
}

async function overlay(mask) {
  // The mask's colours over the frame, the background (palette 0, black) left transparent.
  const data = pixels(mask);
  const rgba = data.data;
  for (let i = 0; i < rgba.length; i += 4) {
    rgba[i + 3] = rgba[i] | rgba[i + 1] | rgba[i + 2] ? MASK_ALPHA : 0;
  }
  return createImageBitmap(data, BITMAP_OPTIONS);
}

page.maskLabels = function (t) {
  // The object id of every pixel of the mask shown on frame t (row-major), decoded from its
  // colours with the palette: what the page shows, for tests to compare.
  const ids = new Map(page.session.palette.map(([r, g, b], id) => [(r << 16) | (g << 8) | b, id]));
  const rgba = pixels(page.masks[t]).data;
  const labels = new Array(rgba.length / 4);
  for (let i = 0; i < labels.length; i++) {
    const key = (rgba[4 * i] << 16) | (rgba[4 * i + 1] << 8) | rgba[4 * i + 2];
    labels[i] = ids.has(key) ? ids.get(key) : -1;
  }
  return labels;
};

async function exportFiles() {
  $("export").disabled = true;
  $("export-result").textContent = "exporting…";
  try {
    const reply = await api("/api/export", {});
    const masks = reply.files.filter((f) => f.endsWith(".png")).length;
    $("export-result").textContent = `wrote ${masks} masks, the scribbles and an overlay ` +
      `video into ${reply.output}`;
    document.body.dataset.exported = String(reply.files.length);
  } catch (error) {
    $("export-result").textContent = "";
    showMessage(error.message);
  } finally {
    $("export").disabled = !page.session.has_masks;
  }
}

// ------------------------------------------------------------------------------ controls

$("prev").addEventListener("click", (e) => showFrame(page.current - 1, e.timeStamp));
$("next").addEventListener("click", (e) => showFrame(page.current + 1, e.timeStamp));
$("play").addEventListener("click", togglePlay);
$("slider").addEventListener("input", (e) => showFrame(Number(e.target.value), e.timeStamp));
$("eraser").addEventListener("click", toggleEraser);
$("undo").addEventListener("click", undo);
$("add-object").addEventListener("click", () => setObjects(page.session.num_objects + 1));
$("remove-object").addEventListener("click", () => setObjects(page.session.num_objects - 1));
$("show-masks").addEventListener("change", (e) => { page.showMasks = e.target.checked; draw(); });
$("segment").addEventListener("click", segment);
$("cancel").addEventListener("click", cancel);
$("export").addEventListener("click", exportFiles);

document.addEventListener("keydown", (event) => {
  if (!page.session || document.body.dataset.ready !== "1") return;
  if (event.target.tagName === "INPUT" && event.target.type !== "checkbox" &&
      event.key.startsWith("Arrow")) return;  // the slider steps itself
  if (event.key === "ArrowLeft") showFrame(page.current - 1, event.timeStamp);
  else if (event.key === "ArrowRight") showFrame(page.current + 1, event.timeStamp);
  else if (event.key === " ") togglePlay();
  else if (event.key === "z" || (event.key === "Z" && event.ctrlKey)) undo();
  else if (event.key === "e") toggleEraser();
  else if (event.key === "m") $("show-masks").click();
  else if (/^[0-9]$/.test(event.key)) selectBrush(Number(event.key));
  else return;
  event.preventDefault();
});

async function start() {
  try {
    await refreshSession();
  } catch (error) {
    showMessage(`cannot reach the server: ${error.message}`);
    return;
  }
  const session = page.session;
  $("video-name").textContent = session.video;
  document.title = `stm annotate: ${session.video}`;
  canvas.width = session.width;
  canvas.height = session.height;
  document.body.style.setProperty("--aspect", String(session.width / session.height));
  $("slider").max = String(session.num_frames - 1);
  restorePending();
  renderObjects();
  let loaded = 0;
  await Promise.all(Array.from({length: session.num_frames}, async (_, t) => {
    page.frames[t] = await bitmap(`/api/frames/${t}.jpg`);
    loaded += 1;
    $("loading").textContent = `loading frames: ${loaded} of ${session.num_frames}`;
    if (t === page.current) draw();
  }));
  $("loading").hidden = true;
  showFrame(0);
  showProgress(session.progress);
  if (session.continued && session.rounds.length) {
    showMessage(`continuing the session saved in the output folder: ${session.rounds.length} ` +
      "round(s) (stm annotate --restart starts a new one)", "info");
  }
  document.body.dataset.ready = "1";
  if (session.progress.running) await follow();  // a round or a replay under way
  else await loadMasks();
  setBusy(false);
}

start().catch((error) => showMessage(error.message));
