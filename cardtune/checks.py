"""``cardtune check --model-path``: a card applied to a real model folder, checked end to end.

Static card checks (schema, known loader and collator) need no files. These checks load the
tokenizer and processor the way training does, apply the card (special-token fix-ups,
template), and run a probe conversation through the masking engine:

- special tokens and their ids after the fix-ups;
- bos: added by the tokenizer, written by the template, or both (doubled if tokenized naively);
- the template renders a system prompt and three turns, every message's text present;
- the role tokens the engine found (assistant header, end of turn);
- the end of turn is trained after every answer;
- a masked-label round trip: the supervised tokens decode to exactly the answers and their
  end of turn, nothing else is trained;
- for image models: image tokens are expanded and never trained.

Each check gives a :class:`Check` line; any failure makes ``cardtune check`` exit 1.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

SYSTEM = "You answer in one word."
TURNS = (
    ("Which planet is red?", "Mars."),
    ("And the largest one?", "Jupiter."),
    ("Which one has rings?", "Saturn."),
)
IMAGE_QUESTION, IMAGE_ANSWER = "What colour is this square?", "Orange."


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def line(self) -> str:
        return f"  {self.status.upper():<4} {self.name}: {self.detail}"


@dataclass
class ModelCheck:
    """Every check of one card on one folder."""

    model_id: str
    path: str
    source: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(c.failed for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, *, warn: bool = False) -> bool:
        self.checks.append(Check(name, "ok" if ok else ("warn" if warn else "fail"), detail))
        return ok


def probe_messages(system: bool = True) -> list[dict[str, Any]]:
    msgs = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}] if system else []
    for question, answer in TURNS:
        msgs.append({"role": "user", "content": [{"type": "text", "text": question}]})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def _probe_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (64, 48), (240, 140, 20))


def _decode(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _answers(tok: Any, encoded: Any, roles: Any) -> list[str]:
    """Each supervised span decoded without its end-of-turn tokens (whichever form ends it), stripped."""
    from cardtune.collators.engine import IGNORE_INDEX

    ids = encoded.input_ids
    return [_decode(tok, ids[s : e - roles.closing_before(ids, e)]).strip() for s, e in _spans(encoded.labels, IGNORE_INDEX)]


def _spans(labels: list[int], ignore: int) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, lab in enumerate([*labels, ignore]):
        if lab != ignore and start is None:
            start = i
        elif lab == ignore and start is not None:
            spans.append((start, i))
            start = None
    return spans


def check_model(model_id: str, path: str, card: Any, source: str) -> ModelCheck:
    """Load ``path`` with ``card`` and run every check; never raises for a model problem."""
    from cardtune.loaders import LOADERS

    result = ModelCheck(model_id, path, source)
    loader = LOADERS[card.loader](card, path)
    try:
        processing = loader.load_processing()
    except Exception as exc:  # noqa: BLE001 - any load failure is the check's finding
        result.add("load", False, f"{type(exc).__name__}: {exc}")
        return result
    tok = processing.tokenizer
    what = type(processing.processor).__name__ if processing.processor is not None else "no processor"
    result.add("load", True, f"{type(tok).__name__}, {what}" + "".join(f"; {n}" for n in processing.notes))
    report = getattr(loader, "fixup_report", None)
    if report is not None:
        _check_special_tokens(result, report)
    _check_engine(result, card, processing)
    return result


def _check_special_tokens(result: ModelCheck, report: Any) -> None:
    lines = report.lines()
    result.add("special tokens", True, lines[0].removeprefix("special tokens: "))
    for line in lines[1:]:
        result.add("special tokens", not line.startswith("no pad token"), line, warn=True)


def _check_engine(result: ModelCheck, card: Any, processing: Any) -> None:
    from cardtune.collators.engine import IGNORE_INDEX, ChatEncoder
    from cardtune.conversation import Sample
    from cardtune.errors import SampleError

    tok = processing.tokenizer
    try:
        encoder = ChatEncoder(card, processing)
    except Exception as exc:  # noqa: BLE001 - TemplateProbeError, template exceptions
        result.add("template", False, f"{type(exc).__name__}: {exc}")
        return
    roles = encoder.roles
    sample = Sample("cardtune-check-probe", probe_messages(system=roles.system != "reject"))

    # One encoding of the probe serves the bos check and the round trip.
    try:
        encoded, failure = encoder.encode(sample), None
    except SampleError as exc:
        encoded, failure = None, exc

    # bos: who writes it, and exactly once in what training sees
    _check_bos(result, encoder, encoded.input_ids if encoded is not None else None)

    # template: a system prompt and three turns, every text present
    try:
        rendered = encoder.render(sample)
    except SampleError as exc:
        result.add("template", False, exc.detail or str(exc))
        return
    missing = [t for t in [SYSTEM, *(x for turn in TURNS for x in turn)] if t not in rendered]
    if roles.system == "reject":
        how = "no system prompt (the card refuses them: chat.system reject) and 3 turns"
    else:
        how = "a system prompt " + ("(folded into the first user turn) " if roles.system == "fold" else "") + "and 3 turns"
    result.add("template", not missing, f"renders {how}" + (f"; missing from the render: {missing}" if missing else ""))

    header = _decode(tok, list(roles.assistant_header))
    eot = " or ".join(repr(_decode(tok, list(c))) for c in roles.closings)
    appended = " (appended to each answer: the template writes none)" if roles.appended_end_of_turn else ""
    forms = f"end of turn {eot} {[list(c) for c in roles.closings]}" if len(roles.closings) > 1 else \
        f"end of turn {eot} {list(roles.end_of_turn)}"
    result.add(
        "role tokens", True,
        f"assistant header {header!r} {list(roles.assistant_header)}, {forms}"
        f"{appended}; content as {roles.content}, system {roles.system}",
    )

    if encoded is None:
        result.add("masked-label round trip", False, failure.detail or str(failure))
        return
    ids, labels = encoded.input_ids, encoded.labels
    spans = _spans(labels, IGNORE_INDEX)
    with_eot = sum(1 for _, e in spans if roles.closing_before(ids, e))
    result.add("end of turn trained", with_eot == len(TURNS) and len(spans) == len(TURNS),
               f"{with_eot}/{len(TURNS)} answers end with {eot} in the labels")
    problems = []
    if len(spans) != len(TURNS):
        problems.append(f"{len(spans)} supervised spans for {len(TURNS)} answers")
    for got, (_, answer) in zip(_answers(tok, encoded, roles), TURNS, strict=False):
        if got != answer:
            problems.append(f"span {got!r} != answer {answer!r}")
    if any(lab != IGNORE_INDEX and lab != i for i, lab in zip(ids, labels, strict=True)):
        problems.append("a label differs from its input id")
    trained = sum(e - s for s, e in spans)
    result.add("masked-label round trip", not problems,
               "; ".join(problems) if problems else
               f"{len(TURNS)} answers supervised exactly ({trained} of {len(ids)} tokens trained, "
               f"system and user turns masked)")

    if card.is_multimodal:
        _check_image(result, card, encoder, processing)


def _check_bos(result: ModelCheck, encoder: Any, ids: list[int] | None) -> None:
    """``ids``: the encoded probe, or None when it failed to encode (the round trip says why)."""
    roles, tok = encoder.roles, encoder.tokenizer
    if roles.bos_id is None:
        result.add("bos", True, "the tokenizer has no bos token; none is written")
        return
    if roles.template_writes_bos and roles.tokenizer_adds_bos:
        how = ("written by the template and added by the tokenizer: tokenizing the render with "
               "add_special_tokens=True would double it; cardtune adds none")
    elif roles.template_writes_bos:
        how = "written by the template"
    elif roles.tokenizer_adds_bos:
        how = "added by the tokenizer (the template writes none)"
    else:
        how = "neither added by the tokenizer nor written by the template; none is written"
    if ids is None:
        result.add("bos", True, how)
        return
    bos = roles.bos_id
    want = roles.tokenizer_adds_bos or roles.template_writes_bos
    leads = bool(ids) and ids[0] == bos
    doubled = len(ids) > 1 and ids[0] == ids[1] == bos
    ok = leads == want and not doubled
    found = "starts with it twice" if doubled else ("starts with it once" if leads else "does not start with it")
    result.add("bos", ok, f"{tok.convert_ids_to_tokens(bos)!r} ({bos}) {how}; the encoded probe {found}"
                          + ("" if ok else f", expected {'once' if want else 'none'}"))


def _check_image(result: ModelCheck, card: Any, encoder: Any, processing: Any) -> None:
    from cardtune.collators.engine import IGNORE_INDEX
    from cardtune.conversation import Media, Sample
    from cardtune.errors import SampleError

    if card.load_image:
        if processing.processor is None and processing.image_processor is None:
            # A native image processor that cannot be built here (one that needs torchvision, with
            # no PIL path) fails the check: text passing would hide that images do not. Remote code
            # that is absent or not trusted is a warning: nothing on this machine could serve it.
            why = processing.image_unavailable or "no processor or image processor loads"
            result.add("image", False, f"images cannot be encoded: {why} (images are refused as unsupported_media)",
                       warn=processing.image_remote)
            return
        images: list[Any] = [_probe_image()]
    else:
        images = []
    sample = Sample("cardtune-check-image", [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": IMAGE_ANSWER}]},
    ], images=["cardtune-probe.png"])
    try:
        encoded = encoder.encode(sample, Media(images=images) if images else None)
        want = _processor_image_tokens(processing, card, images[0], encoder.media_token_ids) if images else None
    except SampleError as exc:
        result.add("image", False, exc.detail or str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the processor's own failure, said in one line
        result.add("image", False, f"the processor fails on an image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return
    media_ids = encoder.media_token_ids
    n_media = sum(1 for t in encoded.input_ids if t in media_ids)
    trained_media = sum(1 for t, lab in zip(encoded.input_ids, encoded.labels, strict=True) if t in media_ids and lab != IGNORE_INDEX)
    answer_ok = _answers(encoder.tokenizer, encoded, encoder.roles) == [IMAGE_ANSWER]
    if card.load_image:
        # the processor's own count for the image (one token for a cross-attention model)
        ok = n_media == want and n_media >= 1 and trained_media == 0 and answer_ok
        detail = (f"1 image gives {n_media} image tokens (the processor's count: {want}), {trained_media} trained; "
                  "answer supervised exactly")
    else:
        ok = trained_media == 0 and answer_ok
        detail = "image given by path in the prompt; answer supervised exactly"
    result.add("image", ok, detail if ok else detail.replace("exactly", "exactly: NO"))


def _processor_image_tokens(processing: Any, card: Any, image: Any, media_ids: set[int]) -> int | None:
    """How many media tokens the processor itself gives one image (None without a processor)."""
    processor, token = processing.processor, card.media.placeholder("image")
    if processor is None or not token or "{" in token:
        return None
    out = processor(text=[f"{token}\n"], images=[image], add_special_tokens=False)
    return sum(1 for t in out["input_ids"][0] if int(t) in media_ids)


def format_report(check: ModelCheck) -> str:
    out = io.StringIO()
    out.write(f"{check.model_id} on {check.path} (card: {check.source})\n")
    for c in check.checks:
        out.write(c.line() + "\n")
    return out.getvalue()


def _name_of(folder: Any) -> str:
    """The hub name a folder was downloaded from, when its config.json records one."""
    import json

    config = folder / "config.json"
    if config.is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path") or ""
        return name.rstrip("/").rsplit("/", 1)[-1].lower()
    return ""


def match_model_folders(registry: Any, models_dir: Any) -> tuple[list[tuple[str, Any]], list[Any]]:
    """Pairs (model id, folder) for the sub-folders of ``models_dir`` that a registered model
    names: the folder's name is the model id or the last part of its hub path, or the folder's
    config.json records that hub name. Also returns the folders no model names."""
    from pathlib import Path

    by_name: dict[str, str] = {}
    for model_id in registry.models:
        by_name.setdefault(model_id.lower(), model_id)
    for model_id, spec in registry.models.items():
        by_name.setdefault(spec.hf_path.rstrip("/").rsplit("/", 1)[-1].lower(), model_id)
    pairs, unmatched = [], []
    for folder in sorted(p for p in Path(models_dir).iterdir() if p.is_dir()):
        model_id = by_name.get(folder.name.lower()) or by_name.get(_name_of(folder))
        if model_id is None:
            unmatched.append(folder)
        else:
            pairs.append((model_id, folder))
    return pairs, unmatched
