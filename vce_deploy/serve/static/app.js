// The drawing page: strokes on a canvas -> PNG -> POST /v1/convert -> one canvas per variation.
"use strict";
const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const statusLine = document.getElementById("status");
const errorLine = document.getElementById("error");
const results = document.getElementById("results");

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
}
clearPad();
ctx.lineWidth = 18;
ctx.lineCap = "round";
ctx.lineJoin = "round";
ctx.strokeStyle = "#000";

let drawing = false;
function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}
pad.addEventListener("pointerdown", (event) => {
  drawing = true;
  pad.setPointerCapture(event.pointerId);
  const [x, y] = point(event);
  ctx.beginPath();
  ctx.moveTo(x, y);
  ctx.lineTo(x + 0.1, y + 0.1);
  ctx.stroke();
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const [x, y] = point(event);
  ctx.lineTo(x, y);
  ctx.stroke();
});
function endStroke() {
  if (!drawing) return;
  drawing = false;
  convert();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

// drop an image file: drawn onto the pad, scaled to fit, then converted
pad.addEventListener("dragover", (event) => { event.preventDefault(); pad.classList.add("over"); });
pad.addEventListener("dragleave", () => pad.classList.remove("over"));
pad.addEventListener("drop", (event) => {
  event.preventDefault();
  pad.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (!file) return;
  const image = new Image();
  image.onload = () => {
    clearPad();
    const scale = Math.min(pad.width / image.width, pad.height / image.height);
    const w = image.width * scale, h = image.height * scale;
    ctx.drawImage(image, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    URL.revokeObjectURL(image.src);
    convert();
  };
  image.src = URL.createObjectURL(file);
});

document.getElementById("clear").addEventListener("click", () => { clearPad(); results.replaceChildren(); });
document.getElementById("go").addEventListener("click", () => convert());

function show(answer, roundTripMs) {
  results.replaceChildren();
  const [, n, h, w] = answer.shape;
  for (let k = 0; k < n; k++) {
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.className = "variation";
    const pixels = ctx.createImageData(w, h);
    const image = answer.images[0][k];
    for (let r = 0; r < h; r++) {
      for (let c = 0; c < w; c++) {
        const v = 255 - Math.round(255 * image[r][c]); // strokes are 1: draw them dark on white
        const i = 4 * (r * w + c);
        pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = v;
        pixels.data[i + 3] = 255;
      }
    }
    canvas.getContext("2d").putImageData(pixels, 0, 0);
    results.appendChild(canvas);
  }
  statusLine.textContent = `seed ${answer.seed} | ${answer.backend} ${answer.precision} on ${answer.device}` +
    ` | server ${answer.time_ms.toFixed(1)} ms, round trip ${roundTripMs.toFixed(1)} ms`;
  statusLine.dataset.seed = answer.seed;
  statusLine.dataset.count = n;
}

let busy = null;
async function convert() {
  if (busy) await busy;
  busy = (async () => {
    errorLine.textContent = "";
    const seedBox = document.getElementById("seed");
    if (document.getElementById("newseed").checked) seedBox.value = Math.floor(Math.random() * 2 ** 31);
    const query = new URLSearchParams({
      n: document.getElementById("n").value, seed: seedBox.value,
      temperature: document.getElementById("temperature").value, format: "json",
    });
    const png = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
    const started = performance.now();
    try {
      const reply = await fetch(`/v1/convert?${query}`, { method: "POST", body: png, headers: { "Content-Type": "image/png" } });
      const answer = await reply.json();
      if (!reply.ok) throw new Error(answer.error ? answer.error.message : reply.statusText);
      show(answer, performance.now() - started);
    } catch (err) {
      errorLine.textContent = String(err.message || err);
    }
  })();
  await busy;
  busy = null;
}
