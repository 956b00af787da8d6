"""The original app's `/imagine` request over TorchServe's per-request limit: how one request becomes several
(A1111's requests too, once translated: `plan_fields`).

Decisions, and why:
- **One TorchServe request per iteration.** The original app looped `n_iter` times over batches of `n_samples`, so
  its users ask for 2 × 5 = 10 images, while TorchServe takes at most 8 per request (`max_images` in
  model-config.yaml, which bounds GPU memory). Iteration k is sent as `n_samples` images from seed
  `seed + k·n_samples`, the first seed after the previous iteration's last: since every image has its own generator
  (seed + i), the images are those one big request would make, in the same order (but for the float rounding that
  another batch size may bring on the CPU, where an image can then differ by a level). With variation seeds every
  image keeps the seed and the variation seed counts instead: iteration k gets `subseed + k·n_samples`. The
  iterations go one after another, not all at once: the first invalid field stops the request before any further
  GPU work, progress arrives in order, and one user's 10 images do not crowd every other user out of TorchServe's
  batches.
- **The front draws the seed** when none is given, or −1 as A1111's clients send for "random" (and the variation
  seed, when variation seeds are asked for),
  below 2³² − `max_images`, so every image's seed is known and valid before the first request is sent: the progress
  stream carries `X-Seed` from its first byte, and the seeds of later iterations follow from it.
- **Nothing else of a request is checked here.** A body the front cannot split (not JSON, not an object, a field
  holding an array or object, a `stream` flag that is not a boolean, a count or seed that is not an integer, a
  variation strength that is not a number) is forwarded as it is, so that TorchServe's handler names the field at
  fault. The front only refuses what is its own: more than `max_images` images in one request, a seed (or
  variation seed) its split would carry past 2³² − 1 (TorchServe, which sees one iteration at a time, would refuse
  only a later iteration, after the first had been computed), a PNG answer of several images (TorchServe, asked
  for a stream, would make them all), and the original app's fields that this server cannot honour
  (`front/original_fields.py`). TorchServe's answers are checked for what the split
  counts on: an answer without images and a seed for each is a 502, before a later iteration is sent.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from front.errors import FrontError
from front.original_fields import translate

# Seeds are 32-bit (the API's documented range); image i of a request uses seed + i.
MAX_SEED = 2**32 - 1
BROKEN_ANSWER = "TorchServe answered without images, a seed for each and their parameters"


class _DuplicateKey(ValueError):
    """A body with a key twice: forwarded untouched, since parsing it here would silently keep one of them."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey
    return dict(pairs)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Plan:
    """How one `/imagine` (or translated A1111) request is sent to TorchServe."""

    # The request's fields with the seed filled in, or None when the body is forwarded as it came.
    fields: dict[str, Any] | None
    raw: bytes
    stream: bool
    # TorchServe requests to send, one per iteration; 1 leaves `n_iter` to TorchServe.
    iterations: int
    # The field that counts up per image: the seed, or with variation seeds the variation seed.
    counted: Literal["seed", "subseed"] = "seed"

    @property
    def seed(self) -> int | None:
        return self.fields.get("seed") if self.fields is not None else None

    def check_one_image(self, made: int | None = None, defaults: Mapping[str, Any] | None = None) -> None:
        """A PNG answer holds one image: a request for more (`made` of them, once made) is refused, naming the
        count that asks for them, as the handler would refuse it. `defaults`, the server's as last described, stand
        for counts the body leaves out, so that a default of several images is refused before it is generated."""
        if self.fields is None:
            return  # forwarded as it came: the handler names what is wrong with it first
        defaults = defaults or {}
        n_samples = self.fields.get("n_samples", defaults.get("n_samples", 1))
        n_iter = self.fields.get("n_iter", defaults.get("n_iter", 1))
        images = made or (n_samples * n_iter if is_integer(n_samples) and is_integer(n_iter) else 1)
        if images > 1:
            name = "n_iter" if is_integer(n_iter) and n_iter > 1 else "n_samples"
            raise FrontError(
                400,
                f"Accept: image/png returns one image, but this request makes {images} (n_samples×n_iter); ask for "
                "JSON (Accept: application/json) to get them all",
                name,
            )

    def whole(self) -> bytes:
        """The request as one TorchServe request (a PNG answer's: it holds one image, `check_one_image`)."""
        return self.raw if self.fields is None else json.dumps(self.fields).encode()

    def iteration(self, first: int | None = None) -> bytes:
        """One iteration's request: `n_samples` images, the first's counted seed `first` (None: the request's)."""
        if self.iterations == 1:
            return self.whole()
        assert self.fields is not None, "only a parsed request is split"
        value = self.fields[self.counted] if first is None else first
        return json.dumps({**self.fields, "n_iter": 1, self.counted: value}).encode()


def plan_request(raw: bytes, max_images: int, stream: bool = False) -> Plan:
    """The plan of an `/imagine` body: the original app's own field names become ours (front/original_fields.py),
    then `plan_fields`. Raises FrontError as it does, and for an original field we cannot honour."""
    try:
        fields = json.loads(raw, object_pairs_hook=_refuse_duplicates)
    except (ValueError, RecursionError):
        # Not JSON we can read (nested too deep, say): TorchServe's parser names the problem.
        return Plan(None, raw, stream, 1)
    # No field takes an array or object, and one nested nearly as deep as the parser allows could not even be
    # written back out: such a body goes as it came, and TorchServe's handler names the field.
    if not isinstance(fields, dict) or any(isinstance(value, (list, dict)) for value in fields.values()):
        return Plan(None, raw, stream, 1)
    return plan_fields(translate(fields), raw, max_images, stream)


def plan_fields(fields: dict[str, Any], raw: bytes, max_images: int, stream: bool = False) -> Plan:
    """Read what the front needs of a request's fields (`stream`, `n_samples`, `n_iter`, `seed`, and `subseed` with
    `subseed_strength`) and draw the seeds it counts on if absent; `raw` is what is forwarded when a field is not
    what the split needs, for the handler to name it.

    Raises FrontError for more than `max_images` images and for a counted seed whose last image would pass 2³² − 1.
    """
    fields = dict(fields)
    for name in ("seed", "subseed"):
        if fields.get(name) == -1 and is_integer(fields[name]):  # A1111's way (and its clients') to ask for a draw
            del fields[name]  # also from the fields forwarded whole below, for the handler to name another field
    if not isinstance(fields.get("stream", False), bool):
        return Plan(fields, raw, stream, 1)
    stream = fields.pop("stream", False) or stream
    n_samples, n_iter = fields.get("n_samples", 1), fields.get("n_iter", 1)
    if not (is_integer(n_samples) and is_integer(n_iter) and n_samples >= 1 and n_iter >= 1):
        return Plan(fields, raw, stream, 1)
    images = n_samples * n_iter
    if images > max_images:
        name = "n_iter" if "n_iter" in fields else "n_samples"
        raise FrontError(400, f"n_samples×n_iter must be at most {max_images} images, got {images}", name)
    strength = fields.get("subseed_strength", 0)
    if not is_number(strength):
        return Plan(fields, raw, stream, 1)
    counted: Literal["seed", "subseed"] = "subseed" if strength != 0 else "seed"
    for name in dict.fromkeys(("seed", counted)):
        value = fields.get(name)
        if value is None:
            fields[name] = secrets.randbelow(MAX_SEED - max_images + 2)
        elif not is_integer(value):
            return Plan(fields, raw, stream, 1)
        elif name == counted and not 0 <= value <= MAX_SEED - images + 1:
            # The handler's own message for the whole request: image i has seed + i (or subseed + i), 32-bit.
            raise FrontError(400, f"{name} must be between 0 and {MAX_SEED - images + 1}, got {value}", name)
    return Plan(fields, raw, stream, n_iter if "n_iter" in fields else 1, counted)


@dataclass
class Results:
    """The answers of a request's iterations, gathered into the one answer a single request would have given."""

    images: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    # Each image's variation seed, with variation seeds.
    subseeds: list[int] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    # The same in every iteration: they come from the request's texts. Absent from a server older than this front
    # (a rolling upgrade).
    warnings: list[str] = field(default_factory=list)

    def add(self, answer: Any, plan: Plan) -> None:
        """One iteration's answer to `plan`; one without images, a whole-number seed per image (and variation seed,
        when the plan counts them) and its parameters is TorchServe's fault (502), found before the next iteration
        counts on its seeds."""
        try:
            images, seeds = list(answer["images"]), list(answer["seeds"])
            subseeds = list(answer.get("subseeds", []))
            parameters, warnings = dict(answer["parameters"]), list(answer.get("warnings", []))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise FrontError(502, BROKEN_ANSWER) from None
        subseed_counts = (len(images),) if plan.counted == "subseed" else (0, len(images))
        if (
            not images
            or len(seeds) != len(images)
            or len(subseeds) not in subseed_counts
            or not all(is_integer(seed) for seed in seeds + subseeds)
        ):
            raise FrontError(502, BROKEN_ANSWER)
        self.images += images
        self.seeds += seeds
        self.subseeds += subseeds
        self.parameters = self.parameters or parameters
        self.warnings = self.warnings or warnings

    def next(self, plan: Plan) -> int:
        """The counted seed of the next iteration's first image: one on from the last answer's last (its images are
        the server's `n_samples` when the request names none)."""
        return (self.subseeds if plan.counted == "subseed" else self.seeds)[-1] + 1

    def answer(self, plan: Plan) -> dict[str, Any]:
        """TorchServe's JSON answer for the whole request: all images and seeds, the first iteration's parameters
        with the request's `n_iter`."""
        parameters = {**self.parameters, "n_iter": plan.iterations} if plan.iterations > 1 else self.parameters
        answer = {"images": self.images, "seeds": self.seeds, "parameters": parameters, "warnings": self.warnings}
        return answer | ({"subseeds": self.subseeds} if self.subseeds else {})


def seed_headers(results: Results) -> dict[str, str]:
    """The headers TorchServe reports seeds in, for the original app's clients (and variation seeds, with them)."""
    headers = {"X-Seed": str(results.seeds[0]), "X-Seeds": ",".join(map(str, results.seeds))}
    return headers | ({"X-Subseeds": ",".join(map(str, results.subseeds))} if results.subseeds else {})
