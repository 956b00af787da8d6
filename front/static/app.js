// The page's behaviour: build a request from the form, follow /imagine/stream, show progress, results and errors.
// User text (prompts, error messages) only ever goes into textContent: it is shown as text, never parsed as HTML.

import { pngParameters, settingsFrom } from "./infotext.js";

const $ = (id) => document.getElementById(id);
const form = $("form");
const progress = $("progress");
const status = $("status");
const preview = $("preview");
const gallery = $("gallery");

// The error element of each request field the server may name; others are shown under the Generate button.
const ERROR_SLOTS = {
  H: "size",
  W: "size",
  n_iter: "n_samples",
  mask_blur: "mask_image",
  masked_content: "mask_image",
  inpaint_area: "mask_image",
  masked_area_padding: "mask_image",
  seed_resize_from_h: "seed_resize",
  seed_resize_from_w: "seed_resize",
  hr_resize_x: "hr_resize",
  hr_resize_y: "hr_resize",
};
// The control to mark invalid for each field.
const CONTROLS = { init_image: "init_file", mask_image: "mask" };

let initImage = null; // data: URL of the img2img init image, or null for txt2img
let strengthControl = "strength"; // the slider that set the last request's strength: img2img's or the hires fix's
const mask = $("mask"); // the inpainting mask, painted white over the init image at its own size
let masked = false; // whether anything was painted: an empty mask sends none (img2img)
const EDITOR_HEIGHT = 320; // the most CSS pixels the init image is shown tall

// A number field's value: a number when it reads as one, else the text as typed, so that the server names the
// field and says what is wrong (the server is the one place the rules live).
function integer(value) {
  return /^\s*-?\d+\s*$/.test(value) ? Number(value) : value;
}

function number(value) {
  return value.trim() !== "" && Number.isFinite(Number(value)) ? Number(value) : value;
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    W: integer($("W").value),
    H: integer($("H").value),
    ddim_steps: integer($("ddim_steps").value),
    scale: number($("scale").value),
    sampler: $("sampler").value,
    n_samples: integer($("n_samples").value),
    n_iter: 1, // the page's images are one batch: not a server default of more, which its bar would not count
    weighted_subprompts: $("weighted_subprompts").checked,
    emphasis: $("emphasis").checked,
    clip_skip: integer($("clip_skip").value),
  };
  if (!$("eta").disabled) body.eta = number($("eta").value); // the other samplers have none
  if ($("tiling").checked) body.tiling = true;
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  if ($("seed_fixed").checked && $("seed").value.trim() !== "") body.seed = integer($("seed").value);
  // Variation seeds: image i keeps the seed and bends toward the variation seed + i (the server draws one if empty).
  if (Number($("subseed_strength").value) !== 0) {
    body.subseed_strength = number($("subseed_strength").value);
    if ($("subseed").value.trim() !== "") body.subseed = integer($("subseed").value);
  }
  // Resize seed from: sent once either side is filled in, so that one side alone is named by the server's error.
  const seedResize = filledSides(["seed_resize_from_w", "seed_resize_from_h"]);
  if (seedResize) [body.seed_resize_from_w, body.seed_resize_from_h] = seedResize;
  strengthControl = "strength";
  if (initImage) {
    body.init_image = initImage;
    body.strength = number($("strength").value);
    body.resize_mode = $("resize_mode").value;
    if (masked) {
      body.mask_image = maskImage();
      body.mask_blur = integer($("mask_blur").value);
      if ($("invert_mask").checked) body.invert_mask = true;
      body.masked_content = $("masked_content").value;
      body.inpaint_area = $("inpaint_area").value;
      if (body.inpaint_area === "only_masked") body.masked_area_padding = integer($("masked_area_padding").value);
    }
  }
  if (hiresOn()) {
    const resize = hiresResize();
    if (resize) [body.hr_resize_x, body.hr_resize_y] = resize;
    else body.hr_scale = number($("hr_scale").value);
    body.hr_upscaler = $("hr_upscaler").value;
    body.hr_steps = integer($("hr_steps").value);
    for (const id of HIRES_OWN) if ($(id).value !== "") body[id] = $(id).value;
    body.strength = number($("hr_strength").value);
    strengthControl = "hr_strength";
  }
  return body;
}

// Whether the hires fix is asked for: text to image only (its section is disabled with an init image), and an
// empty box means off, as 1 (the scale) or 0 (a resize side) does.
function hiresOn() {
  const scale = $("hr_scale").value.trim();
  return !initImage && (hiresResize() !== null || (scale !== "" && Number(scale) !== 1));
}

// The sides [width, height] of the boxes `ids` once either holds something other than 0 (an empty box is 0), else
// null: a pair of sides where 0 means "not set", as the seed resize's and the hires resize's are.
function filledSides(ids) {
  const sides = ids.map((id) => $(id).value.trim());
  return sides.some((side) => side !== "" && Number(side) !== 0) ? sides.map((side) => integer(side || "0")) : null;
}

// The hires fix's resize sides once either is filled in (then sent in place of the scale, which A1111 does not read
// then either), else null.
function hiresResize() {
  return filledSides(["hr_resize_x", "hr_resize_y"]);
}

// The hires fix's second pass's own prompts and sampler, each sent when not empty (empty: the first pass's).
const HIRES_OWN = ["hr_prompt", "hr_negative_prompt", "hr_sampler"];

// PLMS runs text to image only, and the hires fix's second pass is an image to image (unless it has a sampler of
// its own, which cannot be PLMS): the server says so too.
function setPlms() {
  const plms = $("sampler").querySelector("option[value='plms']");
  plms.disabled = Boolean(initImage) || (hiresOn() && $("hr_sampler").value === "");
  if (plms.disabled && $("sampler").value === "plms") $("sampler").value = "ddim";
  setEta();
}

// η is DDIM's alone: its box is off while another sampler runs either pass, and not sent.
function setEta() {
  const second = hiresOn() ? $("hr_sampler").value : "";
  $("eta").disabled = $("sampler").value !== "ddim" || !["", "ddim"].includes(second);
}

// The mask as the server reads it: a PNG of the init image's size, white where painted, black elsewhere.
function maskImage() {
  const flat = document.createElement("canvas");
  flat.width = mask.width;
  flat.height = mask.height;
  const context = flat.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, flat.width, flat.height);
  context.drawImage(mask, 0, 0);
  return flat.toDataURL("image/png");
}

// An empty mask the size of the init image (setting a canvas's size clears it).
function clearMask(width = mask.width, height = mask.height) {
  mask.width = width;
  mask.height = height;
  masked = false;
}

// Paints a round-ended stroke from the last point to this one, in image pixels (the brush is in screen pixels).
let lastPoint = null;
function paint(event) {
  const scale = mask.width / mask.clientWidth;
  const point = [event.offsetX * scale, event.offsetY * scale];
  const context = mask.getContext("2d");
  context.strokeStyle = "#fff";
  context.lineCap = "round";
  context.lineJoin = "round";
  context.lineWidth = Number($("brush").value) * scale;
  context.beginPath();
  context.moveTo(...(lastPoint ?? point));
  context.lineTo(...point);
  context.stroke();
  lastPoint = point;
  masked = true;
}

function clearErrors() {
  for (const element of document.querySelectorAll(".error")) element.textContent = "";
  for (const element of document.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
}

function showError(message, field) {
  if (field === "strength") field = strengthControl;
  const slot = $(`error-${ERROR_SLOTS[field] ?? field}`) ?? $("error-form");
  slot.textContent = message;
  const control = $(CONTROLS[field] ?? field);
  if (control) {
    control.setAttribute("aria-invalid", "true");
    control.focus();
  }
}

// The bar and the status line; `announced` text is also read out by screen readers (the run's start and end, not
// every step).
function setProgress(fraction, text, announced = false) {
  progress.value = Math.min(1, Math.max(0, fraction));
  status.textContent = text;
  if (announced) $("announce").textContent = text;
}

function button(label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.addEventListener("click", onClick);
  return element;
}

function text(tag, className, content) {
  const element = document.createElement(tag);
  element.className = className;
  element.textContent = content;
  return element;
}

// A base64 PNG's [width, height], read from its header: a hires fix's image is the size the server made it, an
// only-masked inpainting's the init image's.
function pngSize(png) {
  const header = atob(png.slice(0, 32)); // the signature, IHDR's length and name, then its width and height
  const read = (at) => [0, 1, 2, 3].reduce((value, i) => value * 256 + header.charCodeAt(at + i), 0);
  return [read(16), read(20)];
}

function describe(parameters, png) {
  let size = `${parameters.W}×${parameters.H}`;
  const made = pngSize(png).join("×");
  if (parameters.hr_upscaler !== undefined || (parameters.inpaint_area === "only_masked" && made !== size)) {
    size += ` → ${made}`;
  }
  const parts = [size, `${parameters.ddim_steps} steps`, `guidance ${parameters.scale}`];
  const sampler = $("sampler").querySelector(`option[value="${CSS.escape(parameters.sampler ?? "ddim")}"]`);
  if (sampler && sampler.value !== "ddim") parts.push(sampler.textContent);
  if (parameters.eta) parts.push(`η ${parameters.eta}`);
  if (parameters.hr_upscaler !== undefined) {
    const upscaler = $("hr_upscaler").querySelector(`option[value="${CSS.escape(parameters.hr_upscaler)}"]`);
    const name = upscaler?.textContent ?? parameters.hr_upscaler;
    const how = parameters.hr_scale === undefined ? "resize" : `×${parameters.hr_scale}`;
    parts.push(`hires fix ${how} (${name}, ${parameters.hr_steps} steps)`);
  }
  if (parameters.strength !== undefined) parts.push(`strength ${parameters.strength}`);
  if (parameters.inpainted) {
    parts.push(parameters.inpaint_area === "only_masked" ? "inpainted, only masked" : "inpainted");
  }
  if (parameters.weighted_subprompts) parts.push("weighted sub-prompts");
  if (parameters.emphasis) parts.push("A1111 emphasis");
  if (parameters.seed_resize_from_w) {
    parts.push(`seed from ${parameters.seed_resize_from_w}×${parameters.seed_resize_from_h}`);
  }
  if (parameters.tiling) parts.push("tiling");
  if (parameters.clip_skip > 1) parts.push(`clip skip ${parameters.clip_skip}`);
  return parts.join(" · ");
}

// A result's seeds back in the form, to make it again or vary it: its seed, and its variation seed and strength.
function useSeed(seed, subseed, strength) {
  $("seed_fixed").checked = true;
  $("seed").value = seed;
  $("subseed").value = subseed ?? "";
  $("subseed_strength").value = subseed === undefined ? 0 : strength;
  $("subseed_strength_value").value = $("subseed_strength").value;
  $("seed").focus();
}

// The server's limits (model-config.yaml's handler.limits) on an init image and the pixels of a request: the shipped
// file's until the server's own come (`applyServerSettings`).
const limits = { max_init_image_bytes: 10 * 1024 * 1024, max_pixels: 1024 * 1024, min_side: 64, max_side: 2048 };

// The size to generate an init image at: its own, in multiples of 8, scaled down to the server's limits (or up to its
// least side) keeping its shape. The server stretches an init image to W×H: the form's size would distort it.
function sizeFor(width, height) {
  const { max_pixels: pixels, min_side: least, max_side: most } = limits;
  const scale = Math.min(1, Math.sqrt(pixels / (width * height)), most / Math.max(width, height));
  const lift = Math.max(1, least / Math.min(width * scale, height * scale));
  const side = (length) => Math.min(most, Math.max(least, Math.floor((length * scale * lift) / 8) * 8));
  return [side(width), side(height)];
}

// The size preset that W×H is, or Custom.
function matchPreset() {
  const preset = `${$("W").value}x${$("H").value}`;
  $("preset").value = [...$("preset").options].some((option) => option.value === preset) ? preset : "custom";
}

function setInitImage(dataUrl) {
  initImage = dataUrl;
  $("init_preview").src = dataUrl ?? "";
  $("init").hidden = !dataUrl;
  clearMask(1, 1);
  // Strength and the resize mode only mean something with an init image, and the hires fix without one.
  $("strength").disabled = !dataUrl;
  $("resize_mode").disabled = !dataUrl;
  $("hires").disabled = Boolean(dataUrl);
  setPlms();
  // Emptied either way: a file picked again after a result was sent back must fire "change" again.
  $("init_file").value = "";
  $("error-init_image").textContent = "";
  $("init_file").removeAttribute("aria-invalid");
  if (!dataUrl) return;
  const image = new Image();
  image.addEventListener("load", () => {
    if (initImage !== dataUrl) return; // another image was picked while this one loaded
    clearMask(image.naturalWidth, image.naturalHeight);
    // Shown as large as fits (small images too, to paint on), its shape kept.
    const fit = Math.min($("init").clientWidth / image.naturalWidth, EDITOR_HEIGHT / image.naturalHeight);
    $("init_preview").style.width = `${Math.floor(image.naturalWidth * fit)}px`;
    const [width, height] = sizeFor(image.naturalWidth, image.naturalHeight);
    $("W").value = width;
    $("H").value = height;
    changed.add("W").add("H");
    matchPreset();
  });
  image.src = dataUrl;
}

function resultItem(png, seed, subseed, parameters, warnings) {
  const source = `data:image/png;base64,${png}`;
  const strength = parameters.subseed_strength;
  const item = document.createElement("li");
  item.className = "result";
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.src = source;
  image.alt = `Result with seed ${seed}` + (subseed === undefined ? "" : ` and variation seed ${subseed}`);
  const caption = document.createElement("figcaption");
  caption.append(
    text("p", "seed", subseed === undefined ? `Seed ${seed}` : `Seed ${seed} · variation ${subseed} (${strength})`),
    text("p", "prompt", parameters.prompt),
    text("p", "negative", parameters.negative_prompt ? `Negative: ${parameters.negative_prompt}` : ""),
    text("p", "parameters", describe(parameters, png)),
    ...warnings.map((warning) => text("p", "warning", warning)),
  );
  const download = document.createElement("a");
  download.href = source;
  download.download = subseed === undefined ? `seed_${seed}.png` : `seed_${seed}_variation_${subseed}.png`;
  download.textContent = "Download";
  const actions = document.createElement("div");
  actions.className = "result-actions";
  actions.append(
    download,
    button("Reuse seed", () => useSeed(seed, subseed, strength)),
    // Every setting it was made with, read back from its PNG as a picked file's are (A1111's "Send to txt2img").
    button("Reuse settings", () => {
      const bytes = Uint8Array.from(atob(png), (character) => character.charCodeAt(0));
      const which = subseed === undefined ? `seed ${seed}` : `seed ${seed}, variation ${subseed}`;
      readSettings(`the result of ${which}`, Promise.resolve(bytes.buffer));
      $("prompt").focus();
    }),
    button("Use as init image", () => {
      setInitImage(source);
      $("init").scrollIntoView({ block: "nearest" });
    }),
  );
  figure.append(image, caption, actions);
  item.append(figure);
  return item;
}

// The JSON lines of a streamed answer, as they arrive. The last line holds every image (megabytes of base64, in
// hundreds of pieces): each piece is searched for a line's end once, and a line's pieces joined once, since
// searching the whole line so far at every piece would take seconds.
async function* lines(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pieces = []; // the line so far
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    let start = 0;
    let end;
    while ((end = value.indexOf("\n", start)) >= 0) {
      pieces.push(value.slice(start, end));
      const line = pieces.join("").trim();
      pieces = [];
      start = end + 1;
      if (line) yield JSON.parse(line);
    }
    pieces.push(value.slice(start));
  }
  const rest = pieces.join("").trim();
  if (rest) yield JSON.parse(rest);
}

async function refusal(response) {
  try {
    const body = await response.json();
    return { error: body.error ?? body.detail ?? response.statusText, field: body.field ?? "" };
  } catch {
    return { error: `HTTP ${response.status} ${response.statusText}`, field: "" };
  }
}

// What the form cannot send as the user meant it: a number box holding text the browser could not read as a number
// reads as empty, which would silently mean "random" for the seed.
function unreadable() {
  if ($("seed_fixed").checked && $("seed").validity.badInput) {
    return ["seed must be a whole number from 0 to 4294967295", "seed"];
  }
  if (Number($("subseed_strength").value) !== 0 && $("subseed").validity.badInput) {
    return ["subseed must be a whole number from 0 to 4294967295", "subseed"];
  }
  const sides = ["seed_resize_from_w", "seed_resize_from_h", ...(initImage ? [] : ["hr_resize_x", "hr_resize_y"])];
  if (!initImage && $("hr_scale").validity.badInput) return ["hr_scale must be a number (1: no hires fix)", "hr_scale"];
  for (const id of sides) {
    if ($(id).validity.badInput) return [`${id} must be a whole number of pixels (empty or 0: none)`, id];
  }
  return null;
}

// The request's progress from a step line: the images already done, plus the UNet batch in flight by its share of
// steps. A request whose images are split over several UNet batches restarts the step count in each, so the
// fraction counts images, and only ever goes up. A hires fix's two passes (every line says how many passes the server
// runs, and the second's lines say `hires`; a server older than `passes` is taken at the request's word) share the
// bar by what their steps cost, as the lines say (`first_pass_share`).
function fraction(message, images, body) {
  const count = message.image_count ?? 1;
  const done = (message.image_index + (count * message.step) / message.total) / images;
  if ((message.passes ?? (body.hr_upscaler === undefined ? 1 : 2)) !== 2) return done;
  const first = message.first_pass_share ?? estimatedFirstPassShare(body);
  return message.hires ? first + (1 - first) * done : first * done;
}

// A server older than `first_pass_share`: the first pass's steps over both passes', a second-pass step counted as its
// pixels over the first pass's (the request's values are numbers once the server runs it).
function estimatedFirstPassShare(body) {
  const [x, y] = [body.hr_resize_x ?? 0, body.hr_resize_y ?? 0];
  let area = body.hr_scale ** 2;
  if (x || y) area = x && y ? (x * y) / (body.W * body.H) : (x ? x / body.W : y / body.H) ** 2;
  const steps = typeof body.ddim_steps === "number" ? body.ddim_steps : 50;
  return steps / (steps + (typeof body.hr_steps === "number" && body.hr_steps > 0 ? body.hr_steps : steps) * area);
}

async function generate() {
  clearErrors();
  const problem = unreadable();
  if (problem) {
    showError(...problem);
    return;
  }
  const body = requestBody();
  const generateButton = $("generate");
  generateButton.disabled = true;
  setProgress(0, "Waiting for the server…", true);
  preview.hidden = true;
  const started = performance.now();
  let answered = false; // whether the server's answer began: a failure after it is not one of reaching it
  try {
    const response = await fetch("/imagine/stream", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" },
      body: JSON.stringify(body),
    });
    answered = true;
    if (!response.ok) {
      const { error, field } = await refusal(response);
      setProgress(0, "Refused: see the message in red.", true);
      showError(error, field);
      return;
    }
    const perIteration = typeof body.n_samples === "number" ? body.n_samples : 1;
    for await (const message of lines(response)) {
      if (message.step !== undefined) {
        const images = perIteration * (message.n_iter ?? 1);
        const first = message.image_index + 1;
        const last = message.image_index + (message.image_count ?? 1);
        const which = last - first + 1 < images ? ` · images ${first}–${last} of ${images}` : "";
        const done = Math.max(progress.value, fraction(message, images, body));
        const pass = message.hires ? "Hires fix: step" : "Step";
        setProgress(done, `${pass} ${message.step} of ${message.total}${which}`);
        if (message.preview) {
          preview.src = `data:image/jpeg;base64,${message.preview}`;
          preview.hidden = false;
        }
      } else if (message.images) {
        const warnings = message.warnings ?? [];
        // The answer's parameters leave the images out: whether a mask went with them is the page's to say.
        const parameters = { ...message.parameters, inpainted: "mask_image" in body };
        const item = (png, i) => resultItem(png, message.seeds[i], message.subseeds?.[i], parameters, warnings);
        gallery.prepend(...message.images.map(item));
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        setProgress(1, `Done: ${message.images.length} image(s) in ${seconds} s.`, true);
      } else {
        setProgress(progress.value, "Failed.", true);
        showError(message.error ?? "the server ended the stream without images", message.field ?? "");
      }
    }
  } catch (error) {
    setProgress(progress.value, "Failed.", true);
    const what = answered ? "The server's answer broke off" : "Could not reach the server";
    showError(`${what}: ${error.message}`, "");
  } finally {
    generateButton.disabled = false;
    preview.hidden = true;
  }
}

// The option of a select whose label is `label` (the names PNGs give samplers and upscalers), or undefined.
function optionLabelled(select, label) {
  return [...$(select).options].find((option) => option.textContent === label);
}

// The sliders a PNG's settings may set, by the names PNGs give them: a slider holds values in its steps only.
const SLIDERS = {
  strength: "Denoising strength", hr_strength: "Denoising strength", subseed_strength: "Variation seed strength",
  mask_blur: "Mask blur", masked_area_padding: "Masked area padding",
};

// A PNG's settings put into the form (front/static/infotext.js reads them); what sets nothing here, or is set only
// as near as a slider's steps allow, is added to `unread`.
function applySettings(settings, unread) {
  for (const id of DEFAULT_CONTROLS) changed.add(id); // the PNG's, all of them
  $("prompt").value = settings.prompt;
  $("negative_prompt").value = settings.negative_prompt;
  for (const id of ["ddim_steps", "scale", "clip_skip", "hr_scale", "hr_steps", "W", "H"]) {
    if (settings[id] !== undefined) $(id).value = settings[id];
  }
  $("eta").value = 0;
  for (const [id, name] of Object.entries(SLIDERS)) {
    if (settings[id] === undefined) continue;
    $(id).value = settings[id];
    if (Number($(id).value) !== settings[id]) unread.push(`${name}: ${settings[id]} (set to ${$(id).value})`);
    showSliderValue(id);
  }
  matchPreset();
  $(settings.seed === undefined ? "seed_random" : "seed_fixed").checked = true;
  $("seed").value = settings.seed ?? "";
  $("subseed").value = settings.subseed ?? "";
  [$("seed_resize_from_w").value, $("seed_resize_from_h").value] = settings.seed_resize ?? ["", ""];
  [$("hr_resize_x").value, $("hr_resize_y").value] = settings.hr_resize ?? ["", ""];
  $("hr_prompt").value = settings.hr_prompt ?? "";
  $("hr_negative_prompt").value = settings.hr_negative_prompt ?? "";
  $("hr_sampler").value = "";
  for (const id of ["tiling", "emphasis", "weighted_subprompts", "invert_mask"]) $(id).checked = settings[id];
  for (const id of ["masked_content", "inpaint_area"]) $(id).value = settings[id];
  setPadding();
  const named = { hr_sampler: "Hires sampler", sampler: "Sampler", hr_upscaler: "Hires upscaler" };
  for (const [id, name] of Object.entries(named)) {
    if (id === "sampler") setPlms(); // whether PLMS may run depends on the hires fix and its sampler, just set
    if (settings[id] === undefined) continue;
    const option = optionLabelled(id, settings[id]);
    if (option && !option.disabled) $(id).value = option.value;
    else unread.push(`${name}: ${settings[id]}`);
  }
  // η is DDIM's: another sampler's (older A1111 wrote one for PLMS too), one whose sampler was not set, or one beside
  // a hires sampler of another kind (η off) is named.
  setEta();
  if (settings.eta !== undefined) {
    if (settings.sampler === "DDIM" && $("sampler").value === "ddim" && !$("eta").disabled) {
      $("eta").value = settings.eta;
    } else unread.push(`Eta DDIM: ${settings.eta}`);
  }
}

let settingsRead = 0; // which PNG's settings are being read: of two picked in a row, the later one wins

// The settings of PNG `bytes` (a promise of its ArrayBuffer) into the form; `name` says which PNG in the messages.
async function readSettings(name, bytes) {
  $("settings_note").textContent = "";
  $("error-settings_file").textContent = "";
  $("settings_file").removeAttribute("aria-invalid");
  const reading = ++settingsRead;
  let text;
  try {
    text = await pngParameters(await bytes);
  } catch {
    text = null; // a chunk that does not inflate
  }
  if (reading !== settingsRead) return;
  const { settings, unread } = text === null ? { settings: null } : settingsFrom(text);
  if (settings === null) {
    showError(`${name} holds no generation settings (a PNG made here, or by AUTOMATIC1111, does)`, "settings_file");
    return;
  }
  applySettings(settings, unread);
  const notes = [`Settings of ${name} set.`];
  if (settings.strength !== undefined && !initImage) {
    const mask = settings.mask_blur === undefined ? "" : " and a mask";
    notes.push(`It was made from an init image${mask}: pick it below.`);
  }
  if (settings.strength === undefined && initImage) notes.push("It was made without an init image: remove yours.");
  if (unread.length > 0) notes.push(`Not available here: ${unread.join("; ")}.`);
  $("settings_note").textContent = notes.join(" ");
}

function readFile(file) {
  if (!file) return;
  if (!["image/png", "image/jpeg", "image/webp"].includes(file.type)) {
    showError(`${file.name} is not a PNG, JPEG or WebP image`, "init_image");
    return;
  }
  if (file.size > limits.max_init_image_bytes) {
    const megabytes = (file.size / 2 ** 20).toFixed(1);
    const most = limits.max_init_image_bytes;
    showError(`${file.name} is ${megabytes} MB: init_image must be at most ${most} bytes`, "init_image");
    return;
  }
  const reader = new FileReader();
  reader.addEventListener("load", () => setInitImage(reader.result));
  reader.readAsDataURL(file);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter" && !$("generate").disabled) {
    event.preventDefault();
    form.requestSubmit();
  }
});

$("preset").addEventListener("change", () => {
  const [width, height] = $("preset").value.split("x");
  if (height === undefined) return;
  $("W").value = width;
  $("H").value = height;
  changed.add("W").add("H");
});
for (const id of ["W", "H"]) {
  $(id).addEventListener("input", () => {
    $("preset").value = "custom";
  });
}
// Typing a seed fixes it; emptying the box goes back to a random one, as its placeholder says.
$("seed").addEventListener("input", () => {
  const empty = $("seed").value === "" && !$("seed").validity.badInput;
  $(empty ? "seed_random" : "seed_fixed").checked = true;
});
// The hires sampler's choices: the sampler's, but PLMS.
for (const option of $("sampler").options) {
  if (option.value !== "plms") $("hr_sampler").append(new Option(option.textContent, option.value));
}
for (const id of ["hr_scale", "hr_resize_x", "hr_resize_y"]) $(id).addEventListener("input", setPlms);
$("hr_sampler").addEventListener("change", setPlms);
$("sampler").addEventListener("change", setEta);
// The padding is the only-masked box's: offered with that inpaint area alone.
function setPadding() {
  $("masked_area_padding").disabled = $("inpaint_area").value !== "only_masked";
}
$("inpaint_area").addEventListener("change", setPadding);
setPadding(); // a reloaded page may come back with only masked chosen
setPlms(); // a reloaded page may come back with another sampler and hires fix chosen
// Each slider's number beside it, kept as it moves, and shown for the value a reloaded page comes back with.
const SLIDER_VALUES = ["strength", "hr_strength", "subseed_strength", "brush", "mask_blur", "masked_area_padding"];
function showSliderValue(id) {
  $(`${id}_value`).value = $(id).value;
}
for (const id of SLIDER_VALUES) {
  $(id).addEventListener("input", () => showSliderValue(id));
  showSliderValue(id);
}

// The server's defaults (model-config.yaml's handler.defaults) the page takes, each set in the control of its
// name: not n_iter, since the page's images are one batch; strength is img2img's slider's (the hires fix's starts
// at A1111's 0.7).
const DEFAULT_CONTROLS = [
  "W", "H", "ddim_steps", "scale", "eta", "n_samples", "strength", "sampler", "weighted_subprompts", "emphasis",
  "clip_skip", "mask_blur", "hr_upscaler", "hr_steps",
];

// The controls set since the page loaded, by the user or by the page for them (a PNG's settings, an init image's
// size): the server's defaults, which may come late (the description waits its turn behind generations), leave them.
const changed = new Set();
for (const type of ["input", "change"]) form.addEventListener(type, (event) => changed.add(event.target.id));

// Whether a control still holds the value the page came with (not changed since it loaded, nor restored by a reload).
function untouched(control) {
  if (changed.has(control.id)) return false;
  if (control.type === "checkbox") return control.checked === control.defaultChecked;
  if (control.tagName === "SELECT") {
    const first = [...control.options].find((option) => option.defaultSelected) ?? control.options[0];
    return control.value === first.value;
  }
  return control.value === control.defaultValue;
}

// `value` as the control's default and value (a select without such an option keeps its own).
function setDefault(control, value) {
  if (control.type === "checkbox") {
    control.checked = control.defaultChecked = value === true;
  } else if (control.tagName === "SELECT") {
    const chosen = [...control.options].find((option) => option.value === String(value));
    if (!chosen) return;
    for (const option of control.options) option.defaultSelected = option === chosen;
    control.value = chosen.value;
  } else {
    control.value = control.defaultValue = String(value);
  }
}

// The server's defaults and limits, as its worker describes them: a control not changed yet starts at the server's
// default, where the page's own are the shipped model-config.yaml's (an operator's clip_skip 2 or sampler is the
// page's too), and the boxes and the init image's sizing keep to its limits. Without a description (TorchServe down
// when the page loads) the page's own stand, and the server still applies its limits.
async function applyServerSettings() {
  let described;
  try {
    const response = await fetch("/imagine/description");
    if (!response.ok) return;
    described = await response.json();
  } catch {
    return;
  }
  const defaults = described.defaults ?? {};
  for (const id of DEFAULT_CONTROLS) {
    if (defaults[id] !== undefined && untouched($(id))) setDefault($(id), defaults[id]);
  }
  Object.assign(limits, described.limits ?? {});
  for (const id of ["W", "H"]) [$(id).min, $(id).max] = [limits.min_side, limits.max_side];
  for (const id of ["ddim_steps", "hr_steps"]) $(id).max = limits.max_steps;
  $("n_samples").max = limits.max_images;
  matchPreset();
  SLIDER_VALUES.forEach(showSliderValue);
  setPlms();
}
applyServerSettings();

// The LoRAs and embeddings the server holds (as A1111's API lists them), offered to add to a prompt; each picker is
// hidden when the server holds none, or cannot say.
let lastPrompt = $("prompt"); // where an embedding goes: the prompt field typed in last
for (const id of ["prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"]) {
  $(id).addEventListener("input", () => (lastPrompt = $(id)));
}

// `text` at the end of a prompt field, after a comma unless the field is empty or already ends in one.
function addText(field, text) {
  const current = field.value.replace(/[\s,]*$/, "");
  field.value = current === "" ? text : `${current}, ${text}`;
  field.focus();
}

async function listExtra(url, kind, names) {
  try {
    const response = await fetch(url);
    if (!response.ok) return;
    for (const name of names(await response.json())) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      $(`${kind}_pick`).append(option);
    }
  } catch {
    return;
  }
  if ($(`${kind}_pick`).options.length > 0) {
    $(`${kind}_field`).hidden = false;
    $("extras").hidden = false;
  }
}
listExtra("/sdapi/v1/loras", "lora", (body) => body.map((lora) => lora.name));
listExtra("/sdapi/v1/embeddings", "embedding", (body) => Object.keys(body.loaded));
// A hires prompt of its own carries the prompt's LoRA tags (both passes run on the same weights): it gets the tag too.
$("lora_add").addEventListener("click", () => {
  const tag = `<lora:${$("lora_pick").value}:1>`;
  if ($("hr_prompt").value.trim() !== "") addText($("hr_prompt"), tag);
  addText($("prompt"), tag);
});
$("embedding_add").addEventListener("click", () => addText(lastPrompt, $("embedding_pick").value));

const drop = $("drop");
$("init_file").addEventListener("change", () => readFile($("init_file").files[0]));
$("settings_file").addEventListener("change", () => {
  const file = $("settings_file").files[0];
  $("settings_file").value = ""; // the same file picked again fires "change" again
  if (file) readSettings(file.name, file.arrayBuffer());
});
$("init_clear").addEventListener("click", () => setInitImage(null));
$("mask_clear").addEventListener("click", () => clearMask());
// The two prompt syntaxes read colons each their own way: choosing one sets the other aside.
for (const [id, other] of [["emphasis", "weighted_subprompts"], ["weighted_subprompts", "emphasis"]]) {
  $(id).addEventListener("change", () => {
    if ($(id).checked) $(other).checked = false;
  });
}
mask.addEventListener("pointerdown", (event) => {
  mask.setPointerCapture(event.pointerId);
  lastPoint = null;
  paint(event);
});
mask.addEventListener("pointermove", (event) => {
  if (mask.hasPointerCapture(event.pointerId)) paint(event);
});
mask.addEventListener("pointerup", () => {
  lastPoint = null;
});
// A file dropped beside the drop zone would make the browser open it in place of the page, and its results with it.
// Text dragged into a prompt, and a file dropped on a file picker, keep what the browser does with them.
for (const type of ["dragover", "drop"]) {
  document.addEventListener(type, (event) => {
    const files = event.dataTransfer?.types.includes("Files");
    if (files && !(event.target instanceof HTMLInputElement && event.target.type === "file")) event.preventDefault();
  });
}
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  readFile(event.dataTransfer.files[0]);
});
