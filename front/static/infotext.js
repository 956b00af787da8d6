// The settings a PNG was made with, read from its `parameters` text chunk (AUTOMATIC1111's "infotext", which this
// server writes too: ldm/png_info.py), as the form's fields. Why on the page: a user who finds an image they like,
// made here or by A1111, gets its settings back by picking the file, as with A1111's PNG Info tab.

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];
// A1111's reading of the last line: `Key: value` pairs, a value in JSON quotes when it holds a comma or colon. Sticky:
// `parameters` tries it at one position at a time.
const PARAMETER = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/y;
// A run of the characters a key is made of, and of whitespace (`parameters`).
const KEY_RUN = /[\w \-/]*/y;
const SPACE_RUN = /\s*/y;
// Fields that say what made the image but set nothing on the form (the checkpoint and VAE are the server's).
const INFORMATIVE = ["Model hash", "Model", "VAE hash", "VAE", "Lora hashes", "TI hashes", "Version"];
// The hires fix's second pass's own settings, by their request field, as infotexts name them.
const HIRES_OWN = { hr_prompt: "Hires prompt", hr_negative_prompt: "Hires negative prompt", hr_sampler: "Hires sampler" };
// Inpainting's settings: the request field, A1111's key, and its values' request values.
const INPAINTING = [
  ["masked_content", "Masked content", { fill: "fill", "latent noise": "latent_noise", "latent nothing": "latent_nothing" }],
  ["inpaint_area", "Inpaint area", { "Only masked": "only_masked", "Whole picture": "whole_picture" }],
];

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// The `parameters` text of PNG bytes (tEXt, zTXt or iTXt, compressed or not), or null when there is none.
export async function pngParameters(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || SIGNATURE.some((value, i) => bytes[i] !== value)) return null;
  const view = new DataView(buffer);
  const latin1 = new TextDecoder("latin1");
  for (let position = 8; position + 8 <= bytes.length; ) {
    const length = view.getUint32(position);
    const kind = latin1.decode(bytes.subarray(position + 4, position + 8));
    const data = bytes.subarray(position + 8, position + 8 + length);
    position += 12 + length;
    const zero = data.indexOf(0);
    if (zero < 0 || latin1.decode(data.subarray(0, zero)) !== "parameters") continue;
    if (kind === "tEXt") return latin1.decode(data.subarray(zero + 1));
    if (kind === "zTXt") return latin1.decode(await inflate(data.subarray(zero + 2)));
    if (kind === "iTXt") {
      const compressed = data[zero + 1] === 1;
      // Then the compression method, and the language and translated keyword, each ended by a zero byte.
      const language = data.indexOf(0, zero + 3);
      const start = data.indexOf(0, language + 1) + 1;
      const text = compressed ? await inflate(data.subarray(start)) : data.subarray(start);
      return new TextDecoder("utf-8").decode(text);
    }
  }
  return null;
}

// Where a sticky pattern's match at `position` of `line` ends (-1: none there).
function matchEnd(pattern, line, position) {
  pattern.lastIndex = position;
  return pattern.test(line) ? pattern.lastIndex : -1;
}

// PARAMETER's matches in `line` as [key, value] pairs, in time linear in the line. Why: a plain matchAll tries a key at
// every position of a long run of words and spaces, reading to the run's end each time: a PNG whose last line is a
// long prompt held the page for minutes. Where a try fails, every later start in the same run fails too (a key ends
// at a colon, and the run's end is none), so the scan skips to the run's end, as front/png_info.py's does.
function parameters(line) {
  const found = [];
  let position = 0;
  while (position <= line.length) {
    PARAMETER.lastIndex = position;
    const match = PARAMETER.exec(line);
    if (match) {
      found.push([match[1], match[2]]);
      position = PARAMETER.lastIndex;
      continue;
    }
    const spaces = matchEnd(SPACE_RUN, line, position);
    const run = matchEnd(KEY_RUN, line, position);
    if (spaces > position) position = spaces; // every start in a run of whitespace reaches the same key
    else if (run > position && line[run] !== ":") position = run;
    else position += 1;
  }
  return found;
}

// The prompt, the negative prompt and the `Key: value` fields of an infotext, split as A1111 splits them: the last
// line is the fields when it holds three or more, and "Negative prompt:" starts the negative prompt's lines.
function splitInfotext(text) {
  const lines = text.trim().split("\n");
  const last = lines.pop();
  let pairs = parameters(last);
  if (pairs.length < 3) {
    lines.push(last);
    pairs = [];
  }
  const prompts = { prompt: [], negative_prompt: [] };
  let current = prompts.prompt;
  for (let line of lines) {
    line = line.trim();
    if (line.startsWith("Negative prompt:")) {
      current = prompts.negative_prompt;
      line = line.slice("Negative prompt:".length).trim();
    }
    current.push(line);
  }
  const fields = new Map();
  for (const [key, value] of pairs) {
    let read = value;
    if (value.length > 1 && value.startsWith('"') && value.endsWith('"')) {
      try {
        read = JSON.parse(value);
      } catch {
        read = value;
      }
    }
    fields.set(key, read);
  }
  return { prompt: prompts.prompt.join("\n"), negative_prompt: prompts.negative_prompt.join("\n"), fields };
}

// "512x768" as [512, 768], or null.
function size(value) {
  const match = /^(\d+)x(\d+)$/.exec(value);
  return match ? [Number(match[1]), Number(match[2])] : null;
}

// A1111 1.9's default schedule ("Automatic") for the samplers it does not run on the model's own levels: Karras'
// (the page's "… Karras" variant), or for DPM++ 2M SDE an exponential one, which is not done here.
const AUTOMATIC_KARRAS = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2S a", "DPM2", "DPM2 a"];
const AUTOMATIC_EXPONENTIAL = ["DPM++ 2M SDE"];

// The form's settings for an infotext, in the request's field names: `sampler`, `hr_upscaler` and `hr_sampler` by
// the names PNGs give them (the page's option labels), `hr_strength` the hires fix's strength, `seed_resize` and `hr_resize`
// [width, height], `seed` undefined for a random one. A setting an infotext leaves out is read as A1111 reads it: no hires fix, variation
// seed, seed resize, clip skip or tiling, A1111's syntax ("Emphasis: Original", its default; this server always
// writes it), and noise drawn on the GPU ("RNG", which this server writes as CPU). `unread` lists the fields that set
// nothing here, as "Key: value"; `settings` is null when the text holds no settings line (a prompt alone).
export function settingsFrom(text) {
  const { prompt, negative_prompt, fields } = splitInfotext(text);
  if (fields.size === 0) return { settings: null, unread: [] };
  // Any "Hires" field says the denoising strength is the hires fix's.
  const hires = [...fields.keys()].some((key) => key.startsWith("Hires "));
  const settings = {
    prompt, negative_prompt, hr_scale: 1, hr_resize: null,
    subseed_strength: 0, seed_resize: null, clip_skip: 1, tiling: false,
    masked_content: "original", inpaint_area: "whole_picture", invert_mask: false,
  };
  const unread = [];
  const take = (key) => {
    const value = fields.get(key);
    fields.delete(key);
    return value;
  };
  const whole = (value) => (/^\d+$/.test(value ?? "") ? Number(value) : undefined);
  const decimal = (value) => (value !== undefined && Number.isFinite(Number(value)) ? Number(value) : undefined);
  const entries = {
    ddim_steps: whole(take("Steps")),
    scale: decimal(take("CFG scale")),
    seed: whole(take("Seed")),
    subseed: whole(take("Variation seed")),
    clip_skip: whole(take("Clip skip")),
    mask_blur: whole(take("Mask blur")),
    masked_area_padding: whole(take("Masked area padding")),
    hr_steps: whole(take("Hires steps")),
    eta: decimal(take("Eta DDIM")),
  };
  for (const [name, value] of Object.entries(entries)) if (value !== undefined) settings[name] = value;
  const dimensions = size(take("Size") ?? "");
  if (dimensions) [settings.W, settings.H] = dimensions;
  const variation = decimal(take("Variation seed strength"));
  if (variation !== undefined && settings.subseed !== undefined) settings.subseed_strength = variation;
  const resize = size(take("Seed resize from") ?? "");
  if (resize && resize[0] > 0 && resize[1] > 0) settings.seed_resize = resize;
  // A1111 1.9 writes the schedule apart from the sampler's name: Karras is the name's Karras variant here (and the
  // hires sampler's, which runs the same schedule unless "Hires schedule type" names its own); Automatic is 1.9's
  // default for the sampler; none written, the name's own (1.6's meaning; 1.6 to 1.8 wrote their override in lower
  // case).
  const written = { "Schedule type": take("Schedule type"), "Hires schedule type": take("Hires schedule type") };
  const hiresKey = written["Hires schedule type"] === undefined ? "Schedule type" : "Hires schedule type";
  const schedule = written["Schedule type"]?.toLowerCase();
  const hiresSchedule = written[hiresKey]?.toLowerCase();
  // The sampler `name` under the schedule `key` names (as written, compared in lower case).
  const scheduled = (name, key) => {
    const which = written[key]?.toLowerCase();
    const base = name.replace(/ Karras$/, "");
    const exponential = `${key}: ${written[key]} (exponential)`;
    if (which === "automatic" && AUTOMATIC_EXPONENTIAL.includes(base) && !unread.includes(exponential)) {
      unread.push(exponential);
    }
    const karras = which === "karras" || (which === "automatic" && AUTOMATIC_KARRAS.includes(base));
    return karras && !name.endsWith(" Karras") ? `${name} Karras` : name;
  };
  const sampler = take("Sampler");
  if (sampler !== undefined) settings.sampler = scheduled(sampler, "Schedule type");
  for (const [key, value] of Object.entries(written)) {
    if (value !== undefined && !["karras", "uniform", "automatic"].includes(value.toLowerCase())) {
      unread.push(`${key}: ${value}`);
    }
  }
  const strength = decimal(take("Denoising strength"));
  const upscale = decimal(take("Hires upscale"));
  // A1111's size asked for instead of a scale, which it then writes in its place (a side of 0: not set).
  const resizeText = take("Hires resize");
  const resized = size(resizeText ?? "");
  const toSize = resized && (resized[0] > 0 || resized[1] > 0) ? resized : null;
  if (resizeText !== undefined && !toSize) unread.push(`Hires resize: ${resizeText}`);
  const upscaler = take("Hires upscaler");
  if (toSize) settings.hr_resize = toSize;
  // At 1, A1111 1.6 runs a second pass at the same size: a resize to it here (the form's scale 1 is none).
  else if (upscale === 1 && settings.W !== undefined) settings.hr_resize = [settings.W, settings.H];
  else if (upscale !== undefined) settings.hr_scale = upscale;
  if (toSize || upscale !== undefined) {
    settings.hr_upscaler = upscaler ?? "Latent";
    if (settings.hr_steps === undefined) settings.hr_steps = 0;
    // The second pass's own prompts and sampler (A1111 writes them only where they differ from the first's).
    for (const [name, key] of Object.entries(HIRES_OWN)) {
      const value = take(key);
      if (value === undefined) continue;
      settings[name] = name === "hr_sampler" ? scheduled(value, hiresKey) : value;
    }
    // A schedule of its own for the first pass's sampler: the hires sampler is that sampler under it.
    const base = sampler?.replace(/ Karras$/, "");
    if (settings.hr_sampler === undefined && base !== undefined && hiresSchedule !== schedule) {
      settings.hr_sampler = scheduled(base, hiresKey);
    }
  }
  if (strength !== undefined) settings[hires ? "hr_strength" : "strength"] = strength;
  // Inpainting's, as A1111 writes them (none: the original pixels, the whole picture, the painted part repainted).
  const maskMode = take("Mask mode");
  settings.invert_mask = maskMode === "Inpaint not masked";
  if (maskMode !== undefined && !settings.invert_mask) unread.push(`Mask mode: ${maskMode}`);
  for (const [name, key, values] of INPAINTING) {
    const value = take(key);
    if (value === undefined) continue;
    if (Object.hasOwn(values, value)) settings[name] = values[value];
    else unread.push(`${key}: ${value}`);
  }
  const rng = take("RNG") ?? "GPU";
  if (rng !== "CPU") unread.push(`RNG: ${rng} (noise is drawn on the CPU here)`);
  if (take("Tiling") === "True") settings.tiling = true;
  settings.weighted_subprompts = take("Weighted subprompts") === "True";
  const emphasis = take("Emphasis") ?? "Original";
  settings.emphasis = emphasis === "Original" && !settings.weighted_subprompts;
  if (!["Original", "None"].includes(emphasis)) unread.push(`Emphasis: ${emphasis}`);
  for (const key of INFORMATIVE) fields.delete(key);
  for (const [key, value] of fields) unread.push(`${key}: ${value}`);
  return { settings, unread };
}
