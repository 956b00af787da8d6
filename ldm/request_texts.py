"""The texts a request's passes read: its prompts, a hires fix's own, their sub-prompts and prompt editing, its
LoRA tags, and what CLIP leaves unread of them.

Why apart from the pipeline: the same reading serves the checks before a model is loaded (`request_checks`), the
encoding (`Pipeline`) and the warnings and hashes of an answer.
"""

from __future__ import annotations

from ldm import composable, emphasis, k_samplers, lora, prompt_editing, subprompts
from ldm.embeddings import Embedding, Vocabulary
from ldm.generation_request import TEXT_FIELDS, GenerationError, GenerationRequest, TextField, hires_run
from ldm.lora import LoraError, LoraUse
from ldm.tokenizer import READ_TOKENS, CLIPTokenizer


def read_texts(request: GenerationRequest) -> list[tuple[str, GenerationRequest, TextField]]:
    """Each text a request's passes read, once, as (the request field it comes from, the pass's request, its text
    field): the prompts, and the hires fix's own prompts (`hires_run`) where it has them."""
    texts = [(field, request, field) for field in TEXT_FIELDS]
    if request.hires:
        second = hires_run(request)
        texts += [(f"hr_{field}", second, field) for field in TEXT_FIELDS if getattr(request, f"hr_{field}")]
    return texts


def pass_field(request: GenerationRequest, field: TextField, hires_pass: bool) -> str:
    """The request field a pass reads its `field` text from, for errors to name: the hires fix's own if it has one."""
    own = f"hr_{field}"
    return own if hires_pass and getattr(request, own) else field


def clip_text(request: GenerationRequest, field: TextField) -> str:
    """What CLIP reads of the request's `prompt` or `negative_prompt` (`field`): the text without LoRA tags."""
    return lora.strip_tags(getattr(request, field))


def request_loras(request: GenerationRequest) -> tuple[LoraUse, ...]:
    """The LoRAs the prompt's tags name, by name (one in the negative prompt is an error: `check_no_lora_tags`)."""
    check_no_lora_tags(request, "negative_prompt")
    try:
        return tuple(sorted(lora.prompt_loras(request.prompt), key=lambda use: use.name))
    except LoraError as error:
        raise GenerationError("prompt", f"prompt: {error}") from None


def check_no_lora_tags(request: GenerationRequest, field: str) -> None:
    """A negative prompt holds no LoRA tag: a tag is read from the prompt alone (as in A1111, where a negative
    prompt's tag does nothing), so one there is an error, not a tag silently read as text."""
    if lora.TAG.search(getattr(request, field)):
        raise GenerationError(field, f"{field}: LoRA tags (<lora:…>) are read from the prompt only")


def run_steps(request: GenerationRequest) -> int:
    """The steps prompt editing counts in the request's run (A1111's count: twice its steps for Heun, DPM2, DPM2 a,
    DPM++ 2S a and DPM++ SDE, which call the UNet twice a step)."""
    return request.steps * k_samplers.unet_calls_per_step(request.sampler)


def text_schedules(
    request: GenerationRequest, field: TextField, hires_pass: bool = False
) -> tuple[prompt_editing.Schedule, ...]:
    """The texts the request's `prompt` or `negative_prompt` (`field`) reads over its run, or over its hires fix's
    second pass, as (end, text): with A1111's syntax, one schedule per sub-prompt of its `AND` (`text_parts`), each
    as its prompt editing changes it (ldm/prompt_editing.py, which counts a second pass on from the first); otherwise
    the one text throughout."""
    run, steps, first, texts = _pass_texts(request, field, hires_pass)
    if not run.emphasis:
        return (((steps, texts[0]),),)
    return tuple(prompt_editing.schedule(text, steps, first) for text in texts)


def text_batches(request: GenerationRequest, field: TextField, hires_pass: bool = False) -> tuple[tuple[str, ...], ...]:
    """Beside each of `text_schedules`' schedules (A1111's syntax), the texts A1111 encodes together for it
    (`prompt_editing.batch`)."""
    run, steps, first, texts = _pass_texts(request, field, hires_pass)
    assert run.emphasis
    return tuple(prompt_editing.batch(text, steps, first) for text in texts)


def _pass_texts(
    request: GenerationRequest, field: TextField, hires_pass: bool
) -> tuple[GenerationRequest, int, int, list[str]]:
    """The pass's request, its steps and the first pass's before it (0 for the first), and the texts its `field`
    reads: with A1111's syntax, the sub-prompts of its `AND`; otherwise the one text."""
    name = pass_field(request, field, hires_pass)
    first, steps = 0, run_steps(request)
    if hires_pass:
        request = hires_run(request)
        first, steps = steps, run_steps(request)
    if not request.emphasis:
        return request, steps, first, [clip_text(request, field)]
    return request, steps, first, [text for text, _ in text_parts(request, field, name)]


def named_texts(request: GenerationRequest, field: TextField) -> list[tuple[str, str]]:
    """Every distinct text the request's `field` reads in each pass, in all its sub-prompts, with the request field
    it comes from (`pass_field`), for errors to name."""
    named: dict[tuple[str, str], None] = {}
    for hires_pass in request.passes:
        name = pass_field(request, field, hires_pass)
        for schedule in text_schedules(request, field, hires_pass):
            named.update(dict.fromkeys((name, text) for _, text in schedule))
    return list(named)


def scheduled_texts(request: GenerationRequest, field: TextField) -> list[str]:
    """Every distinct text the request's `field` reads, in all its passes and sub-prompts."""
    return list(dict.fromkeys(text for _, text in named_texts(request, field)))


def text_parts(request: GenerationRequest, field: TextField, name: str = "") -> subprompts.Parts:
    """The texts the request's `prompt` or `negative_prompt` (`field`) is encoded from, each with its weight:
    optimizedSD's weighted sub-prompts, blended into one conditioning (ldm/subprompts.py), or in A1111's syntax the
    prompt's sub-prompts of `AND`, each guided toward apart (ldm/composable.py). Errors name `name` (the field the
    text came from, when not `field`: `pass_field`)."""
    text = clip_text(request, field)
    try:
        if request.weighted_subprompts:
            return subprompts.split(text)
        if request.emphasis and field == "prompt":
            return composable.split(text)
    except (subprompts.SubpromptError, composable.ComposableError) as error:
        name = name or field
        raise GenerationError(name, f"{name}: {error}") from None
    return ((text, 1.0),)


def unread_warnings(
    tokenizer: CLIPTokenizer, request: GenerationRequest, vocabulary: Vocabulary | None = None
) -> tuple[str, ...]:
    """One line for each of the request's texts (or sub-prompts) longer than the 75 tokens CLIP reads (an embedding
    of `vocabulary` taking a position per vector), with the words it never saw. Why: the original cuts them off
    without a word, and a user should know which words did nothing. At scale 1 the negative prompt does nothing at
    all, so it has nothing to warn of; A1111's syntax reads all."""
    if request.emphasis:
        return ()
    lines = []
    vocabulary = vocabulary or Vocabulary()
    for name, run, field in read_texts(request):
        if request.scale == 1 and field == "negative_prompt":
            continue
        parts = text_parts(run, field)
        for index, (text, _) in enumerate(parts):
            count, tail = vocabulary.unread(tokenizer, text)
            if count:
                where = name if len(parts) == 1 else f"{name}, sub-prompt {index + 1} of {len(parts)}"
                lines.append(f"{where}: CLIP reads {READ_TOKENS} tokens; the {count} after them were left out: {tail}")
    return tuple(lines)


def embeddings_read(tokenizer: CLIPTokenizer, request: GenerationRequest, vocabulary: Vocabulary) -> list[Embedding]:
    """The textual-inversion embeddings CLIP reads of the request's texts, each once, in order: found as its
    conditioning finds them (in A1111's syntax run by run, in every text its prompt editing reads, every chunk
    read; otherwise in each text or sub-prompt, within its 75 positions)."""
    if request.emphasis:  # every text of both passes' schedules
        texts = [text for field in TEXT_FIELDS for text in scheduled_texts(request, field)]
        pieces = [
            piece for text in texts for piece, weight in emphasis.parse(text) if not emphasis.is_break(piece, weight)
        ]
        slots = [slot for piece in pieces for slot in vocabulary.expand(tokenizer.tokenize(piece))]
    else:
        parts = [text for _, run, field in read_texts(request) for text, _ in text_parts(run, field)]
        slots = [slot for text in parts for slot in vocabulary.read(tokenizer, text)[0]]
    found: dict[str, Embedding] = {}
    for slot in slots:
        if isinstance(slot, Embedding):
            found.setdefault(slot.name, slot)
    return list(found.values())
