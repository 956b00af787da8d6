// The page's behaviour: build a request from the form, follow /imagine/stream, show progress, results and errors.
// User text (prompts, error messages) only ever goes into textContent: it is shown as text, never parsed as HTML.

const $ = (id) => document.getElementById(id);
const form = $("form");
const progress = $("progress");
const status = $("status");
const preview = $("preview");
const gallery = $("gallery");

// The error element of each request field the server may name; others are shown under the Generate button.
const ERROR_SLOTS = { H: "size", W: "size", n_iter: "n_samples" };
// The control to mark invalid for each field.
const CONTROLS = { init_image: "init_file" };

let initImage = null; // data: URL of the img2img init image, or null for txt2img

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
    n_samples: integer($("n_samples").value),
  };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  if ($("seed_fixed").checked) body.seed = integer($("seed").value);
  if (initImage) {
    body.init_image = initImage;
    body.strength = number($("strength").value);
  }
  return body;
}

function clearErrors() {
  for (const element of document.querySelectorAll(".error")) element.textContent = "";
  for (const element of document.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
}

function showError(message, field) {
  const slot = $(`error-${ERROR_SLOTS[field] ?? field}`) ?? $("error-form");
  slot.textContent = message;
  const control = $(CONTROLS[field] ?? field);
  if (control) {
    control.setAttribute("aria-invalid", "true");
    control.focus();
  }
}

function setProgress(fraction, text) {
  progress.value = Math.min(1, Math.max(0, fraction));
  status.textContent = text;
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

function describe(parameters) {
  const parts = [`${parameters.W}×${parameters.H}`, `${parameters.ddim_steps} steps`, `guidance ${parameters.scale}`];
  if (parameters.strength !== undefined) parts.push(`strength ${parameters.strength}`);
  return parts.join(" · ");
}

function useSeed(seed) {
  $("seed_fixed").checked = true;
  $("seed").value = seed;
  $("seed").focus();
}

function setInitImage(dataUrl) {
  initImage = dataUrl;
  $("init_preview").src = dataUrl ?? "";
  $("init").hidden = !dataUrl;
  // Strength only means something with an init image.
  $("strength").disabled = !dataUrl;
  if (!dataUrl) $("init_file").value = "";
}

function resultItem(png, seed, parameters) {
  const source = `data:image/png;base64,${png}`;
  const item = document.createElement("li");
  item.className = "result";
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.src = source;
  image.alt = `Result with seed ${seed}`;
  const caption = document.createElement("figcaption");
  caption.append(
    text("p", "seed", `Seed ${seed}`),
    text("p", "prompt", parameters.prompt),
    text("p", "negative", parameters.negative_prompt ? `Negative: ${parameters.negative_prompt}` : ""),
    text("p", "parameters", describe(parameters)),
  );
  const download = document.createElement("a");
  download.href = source;
  download.download = `seed_${seed}.png`;
  download.textContent = "Download";
  const actions = document.createElement("div");
  actions.className = "result-actions";
  actions.append(
    download,
    button("Reuse seed", () => useSeed(seed)),
    button("Use as init image", () => {
      setInitImage(source);
      $("init").scrollIntoView({ block: "nearest" });
    }),
  );
  figure.append(image, caption, actions);
  item.append(figure);
  return item;
}

// The JSON lines of a streamed answer, as they arrive.
async function* lines(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (line) yield JSON.parse(line);
    }
  }
  if (buffer.trim()) yield JSON.parse(buffer);
}

async function refusal(response) {
  try {
    const body = await response.json();
    return { error: body.error ?? body.detail ?? response.statusText, field: body.field ?? "" };
  } catch {
    return { error: `HTTP ${response.status} ${response.statusText}`, field: "" };
  }
}

async function generate() {
  clearErrors();
  const generateButton = $("generate");
  generateButton.disabled = true;
  setProgress(0, "Waiting for the server…");
  preview.hidden = true;
  const started = performance.now();
  try {
    const response = await fetch("/imagine/stream", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" },
      body: JSON.stringify(requestBody()),
    });
    if (!response.ok) {
      const { error, field } = await refusal(response);
      setProgress(0, "Refused: see the message in red.");
      showError(error, field);
      return;
    }
    for await (const message of lines(response)) {
      if (message.step !== undefined) {
        const iterations = message.n_iter ?? 1;
        const done = ((message.iteration ?? 0) + message.step / message.total) / iterations;
        const batch = iterations > 1 ? ` (batch ${message.iteration + 1} of ${iterations})` : "";
        setProgress(done, `Step ${message.step} of ${message.total}${batch}`);
        if (message.preview) {
          preview.src = `data:image/jpeg;base64,${message.preview}`;
          preview.hidden = false;
        }
      } else if (message.images) {
        gallery.prepend(...message.images.map((png, i) => resultItem(png, message.seeds[i], message.parameters)));
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        setProgress(1, `Done: ${message.images.length} image(s) in ${seconds} s.`);
      } else {
        setProgress(progress.value, "Failed.");
        showError(message.error ?? "the server ended the stream without images", message.field ?? "");
      }
    }
  } catch (error) {
    setProgress(0, "Failed.");
    showError(`Could not reach the server: ${error.message}`, "");
  } finally {
    generateButton.disabled = false;
    preview.hidden = true;
  }
}

function readFile(file) {
  if (!file) return;
  if (!["image/png", "image/jpeg"].includes(file.type)) {
    showError(`${file.name} is not a PNG or JPEG image`, "init_image");
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
});
for (const id of ["W", "H"]) {
  $(id).addEventListener("input", () => {
    $("preset").value = "custom";
  });
}
$("seed").addEventListener("input", () => {
  $("seed_fixed").checked = true;
});
$("strength").addEventListener("input", () => {
  $("strength_value").value = $("strength").value;
});

const drop = $("drop");
$("init_file").addEventListener("change", () => readFile($("init_file").files[0]));
$("init_clear").addEventListener("click", () => setInitImage(null));
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
