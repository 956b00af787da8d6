"""AUTOMATIC1111's prompt editing and alternation: texts that change as sampling goes.

Why: prompts shared for A1111 use them (`a [dog:cat:0.5]` paints a dog's pose and a cat's fur), and read as plain
emphasis syntax they would be one de-emphasized phrase, colons and all. They are part of A1111's syntax, so they are
read with it (`emphasis`), never in a prompt sent without it.

The syntax, as A1111 (1.6 and later, its default "new" scheduling) reads it, before its emphasis:
- `[from:to:when]` reads `from` until step `when`, then `to`; `[to:when]` adds `to` at `when`; `[from::when]`
  drops `from` at `when`. Either text may hold brackets, emphasis and more editing.
- `when` with a decimal point is a fraction of the run's steps (`0.25`), without one a step (`10`); floored, and at
  most the run's steps. The run's steps are the request's, twice them for samplers that call the UNet twice a step
  (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE), as A1111 counts.
- `[a|b|c]` takes `a` at step 1, `b` at step 2, `c` at step 3, `a` at step 4, …; an option may be empty.
- A hires fix's second pass (ldm/hires.py) is scheduled on from its first, as A1111 1.6 schedules it: a step counts
  on from the first pass's last (`[a:b:25]` after 20 first-pass steps switches at the second pass's step 5), a
  fraction runs from 1 to 2 over the second pass (`[a:b:1.5]` switches halfway through it, and `[a:b:0.5]` has
  switched before it starts); an alternation starts again at its first option.
- What parses as none of these is text as written: a bracket that closes nothing, an unclosed one. A `|` outside
  an alternation, or a backslash at the very end, makes the whole prompt text, as A1111's parser then gives up.
  Where A1111's parser has two readings (an edit followed at once by a stray `]`, `)` or `:`, as in `[a:b:2]]`) it
  sometimes takes the whole prompt as text; we read the edit.

A schedule is (end, text) pairs, each text the prompt with every construct resolved at step `end`. Sampling counts
UNet calls from 0, and call c reads the first text whose end is at least c: so `[a:b:10]` reads `a` on calls 0 to
10, eleven of them. That is A1111's count (its sampler's step counter against its schedule's ends), kept so a prompt
shared with its image paints it here too. Torch-free, so the handler can check a prompt before it queues it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

Schedule = tuple[tuple[int, str], ...]
# `when` in Lark's SIGNED_NUMBER, the number A1111's grammar reads (ASCII digits only), between optional whitespace
# and `]`.
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")
# The distinct texts a prompt may read over a run. Each is a text-encoder pass and a context kept for the whole run:
# a few alternations with coprime lengths would otherwise make one per step (300 for Heun at 150 steps).
MAX_TEXTS = 64
# A run of plain text: no bracket, colon, bar or backslash (an escape is read one by one).
_PLAIN = re.compile(r"[^\\\[\]():|]+")
# Brackets nested deeper than this are text: the parser recurses per bracket, and a thousand `(` (ldm/emphasis.py
# bounds what they weigh, and says so) must reach that check, not exhaust Python's stack here.
MAX_DEPTH = 100


@dataclass(frozen=True)
class _Edit:
    """`[before:after:when]`; `before` is None for `[after:when]`."""

    before: list[_Node] | None
    after: list[_Node]
    when: str  # as written: whether it holds a decimal point decides what it counts


@dataclass(frozen=True)
class _Alternation:
    options: list[list[_Node]]


_Node = str | _Edit | _Alternation


class _WholeText(Exception):
    """The prompt is not A1111's syntax at all: it is read as written."""


@functools.lru_cache(maxsize=256)
def schedule(text: str, steps: int, first_pass: int = 0) -> Schedule:
    """The texts `text` reads over a run of `steps` (A1111's count: ldm/request_texts.py's `run_steps`), as (end, text)
    pairs with ascending ends, the last `steps`; neighbours with the same text are merged (a lookup finds the same
    text). `first_pass`: the steps of the first pass when this run is a hires fix's second, 0 otherwise."""
    entries: list[tuple[int, str]] = []
    for end, resolved in _entries(text, steps, first_pass):
        if entries and entries[-1][1] == resolved:
            entries.pop()
        entries.append((end, resolved))
    return tuple(entries)


def batch(text: str, steps: int, first_pass: int = 0) -> tuple[str, ...]:
    """The texts of A1111's schedule of `text`, unmerged, as it encodes them: in one batch, so that each shares its
    emphasis rescale with the others, repeats counting (ldm/text_encoder.py's `weigh_batch`)."""
    return tuple(resolved for _, resolved in _entries(text, steps, first_pass))


@functools.lru_cache(maxsize=256)
def _entries(text: str, steps: int, first_pass: int) -> Schedule:
    """A1111's schedule: (end, text) at every step a construct may change the text, and the last; remembered, as a
    request's checks, encoding and batching each ask for it."""
    try:
        nodes = _parse(text)
    except _WholeText:
        return ((steps, text),)
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Edit) and (when := _step(node.when, steps, first_pass)) >= 1:
            ends.add(when)
        elif isinstance(node, _Alternation):
            ends.update(range(1, steps + 1))
    return tuple((end, _resolve(nodes, end, steps, first_pass)) for end in sorted(ends))


def text_at(entries: Sequence[tuple[int, object]], call: int) -> int:
    """Which of a schedule's entries UNet call `call` (from 0) reads: the first whose end is at least `call`."""
    for index, (end, _) in enumerate(entries):
        if call <= end:
            return index
    return len(entries) - 1


def _step(when: str, steps: int, first_pass: int = 0) -> int:
    """The step of this run a written `when` names: a fraction of `steps` with a decimal point, a step without;
    floored, at most `steps` (and a huge one is `steps`, where A1111 would overflow). In a hires fix's second pass
    (`first_pass` > 0), steps count on from the first pass's and fractions from 1."""
    fraction_offset = 1.0 if first_pass else 0.0
    value = (float(when) - fraction_offset) * steps if "." in when else float(when) - first_pass
    return steps if value >= steps else int(max(value, -1.0))


def _resolve(nodes: list[_Node], step: int, steps: int, first_pass: int) -> str:
    """The text `nodes` read at schedule step `step` (1-based)."""
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            chosen = (node.before or []) if step <= _step(node.when, steps, first_pass) else node.after
            out.append(_resolve(chosen, step, steps, first_pass))
        else:
            out.append(_resolve(node.options[(step - 1) % len(node.options)], step, steps, first_pass))
    return "".join(out)


def _walk(nodes: list[_Node]) -> Iterator[_Node]:
    for node in nodes:
        yield node
        if isinstance(node, _Edit):
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternation):
            for option in node.options:
                yield from _walk(option)


def _parse(text: str) -> list[_Node]:
    """The prompt's pieces; at the top, a bracket or colon that is part of no construct is text (A1111's stray
    characters)."""
    nodes, end = _sequence(text, 0, depth=0)
    assert end == len(text)
    return nodes


def _sequence(text: str, pos: int, depth: int) -> tuple[list[_Node], int]:
    """Pieces from `pos` up to the first character the enclosing construct reads (`]`, `)`, `:` or `|`), or to the
    end at the top (depth 0). Raises `_Unparsed` inside a construct that holds a bracket which opens nothing
    well-formed."""
    if depth > MAX_DEPTH:
        raise _Unparsed
    top = depth == 0
    nodes: list[_Node] = []
    while pos < len(text):
        char = text[pos]
        plain = _PLAIN.match(text, pos)
        if plain:
            nodes.append(plain.group(0))
            pos = plain.end()
        elif char == "\\":
            if pos + 1 == len(text) or text[pos + 1] == "\n":
                raise _WholeText
            nodes.append(text[pos : pos + 2])
            pos += 2
        elif char == "|" and top:
            raise _WholeText
        elif char in "[(":
            try:
                pieces, pos = (_bracket if char == "[" else _round)(text, pos, depth + 1)
            except _Unparsed:
                if not top:
                    raise
                pieces, pos = [char], pos + 1
            nodes.extend(pieces)
        elif top:
            nodes.append(char)
            pos += 1
        else:
            break
    return nodes, pos


class _Unparsed(Exception):
    """A construct that does not parse: at the top its bracket is text; inside another, that one fails too."""


def _expect(text: str, pos: int, chars: str) -> str:
    if pos == len(text) or text[pos] not in chars:
        raise _Unparsed
    return text[pos]


def _round(text: str, pos: int, depth: int) -> tuple[list[_Node], int]:
    """`(prompt)` or `(prompt:prompt)`: emphasis, kept as written for ldm/emphasis.py."""
    inner, pos = _sequence(text, pos + 1, depth)
    pieces: list[_Node] = ["(", *inner]
    if _expect(text, pos, ":)") == ":":
        weight, pos = _sequence(text, pos + 1, depth)
        pieces += [":", *weight]
        _expect(text, pos, ")")
    return [*pieces, ")"], pos + 1


def _bracket(text: str, pos: int, depth: int) -> tuple[list[_Node], int]:
    """`[prompt]` (emphasis, kept as written), an alternation or an edit."""
    first, pos = _sequence(text, pos + 1, depth)
    closing = _expect(text, pos, "]|:")
    if closing == "]":
        return ["[", *first, "]"], pos + 1
    if closing == "|":
        options = [first]
        while text[pos] == "|":
            option, pos = _sequence(text, pos + 1, depth)
            options.append(option)
            _expect(text, pos, "]|")
        return [_Alternation(options)], pos + 1
    when = _WHEN.match(text, pos + 1)
    if when:
        return [_Edit(None, first, when.group(1))], when.end()
    second, pos = _sequence(text, pos + 1, depth)
    _expect(text, pos, ":")
    when = _WHEN.match(text, pos + 1)
    if not when:
        raise _Unparsed
    return [_Edit(first, second, when.group(1))], when.end()
