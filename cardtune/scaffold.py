"""``cardtune add-model``: a model card scaffolded from a model folder, then checked.

What the folder says about itself is read by :mod:`cardtune.loaders.discover` (the same
discovery ``--model-path`` alone uses): the model class, the remote code it declares, its
modalities and media tokens, the module keywords (the model built on the meta device, no
weights). Here, on top: whether its chat template renders a conversation the engine can
mask, and which special tokens it lacks. What cannot be read (a template for a folder that
ships none, keywords of a remote-code model whose code is absent or not trusted) is taken from
``--like FAMILY`` when given, and otherwise stops with a message that says so. Remote code
runs only with ``--trust-remote-code``. Everything uncertain is listed for a human to review.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cardtune.loaders.discover import (
    media_tokens,
    module_keywords,
    read_folder,
    read_json,
    recommend_special_tokens,
)
from cardtune.registry.errors import CardError
from cardtune.registry.schema import FamilyCard

_TEMPLATE_FIELDS = ("template", "jinja", "declarative", "end_of_turn", "assistant_header", "system", "content")


@dataclass
class Scaffold:
    """The card written for a folder, and what a human should still look at."""

    card: dict[str, Any]
    """The whole family card (a new family) or the family's card with the new entry."""
    entry: dict[str, Any]
    new_family: bool
    folder: Path
    """The model folder the card was read from (a hub id's downloaded snapshot)."""
    derived: list[str] = field(default_factory=list)
    review: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.card["family"]

    def validated(self) -> FamilyCard:
        return FamilyCard.model_validate(self.card)


def fetch_folder(source: str) -> Path:
    """``source`` as a local folder: a folder as is, a hub id downloaded without weights."""
    folder = Path(source)
    if folder.is_dir():
        return folder
    if folder.exists() or source.count("/") != 1 or source.startswith(("/", ".", "~")):
        raise CardError(f"{source}: no such model folder (and not a hub id: org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            source, allow_patterns=["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt", "*.py"]
        ))
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all one message
        raise CardError(
            f"{source}: not a local folder, and its config and tokenizer files could not be downloaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "download the folder and pass its path"
        ) from None


def hub_name(folder: Path, source: str) -> tuple[str, bool]:
    """(hf_path for the entry, whether it is a real hub id)."""
    if not Path(source).is_dir():
        return source, True
    name = read_json(folder / "config.json").get("_name_or_path") or ""
    if name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/")):
        return name, True
    return str(folder.resolve()), False


def _template_renders(card: FamilyCard, folder: Path) -> tuple[bool, str]:
    """Whether the folder's own template renders a conversation the engine can mask."""
    from cardtune.collators.roles import derive_role_tokens
    from cardtune.loaders import LOADERS

    try:
        processing = LOADERS[card.loader](card, folder).load_processing()
        if processing.renderer.chat_template is None:
            return False, "the folder ships no chat template"
        derive_role_tokens(processing.renderer, processing.tokenizer, card.chat)
    except Exception as exc:  # noqa: BLE001 - TemplateProbeError, template errors
        return False, f"its chat template cannot be used ({type(exc).__name__}: {exc})"
    return True, ""


def scaffold(
    source: str,
    model_id: str,
    registry: Any,
    *,
    family: str | None = None,
    like: str | None = None,
    model_class: str | None = None,
    trust_remote_code: bool = False,
) -> Scaffold:
    """The card for ``source`` (a folder or hub id) registered as ``model_id``.

    ``family`` naming a registered family adds an entry to it (its card decides everything);
    otherwise a new family (named ``family`` or ``model_id``) is written. ``like`` names a
    registered family to take what the folder cannot tell: its chat template when the folder
    ships none, its module keywords when the model cannot be built here. The folder's remote
    code runs only with ``trust_remote_code`` (and the card then says so).
    """
    from pydantic import ValidationError

    from cardtune.registry.schema import ModelEntry

    try:
        ModelEntry(model_id=model_id, hf_path="x")  # the id's shape, with the schema's message
    except ValidationError as exc:
        raise CardError(f"--model_id {model_id!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    if model_id in registry.models:
        src = registry.family_sources[registry.models[model_id].family.family]
        raise CardError(f"model id '{model_id}' is already registered (in {src})")
    folder = fetch_folder(source)
    facts = read_folder(folder)
    hf_path, real_hub = hub_name(folder, source)
    entry = {"model_id": model_id, "hf_path": hf_path}
    review: list[str] = []
    if not real_hub:
        review.append(f"hf_path is the local folder {hf_path}: set the hub id before opening a pull request")

    if family is not None and family in registry.families:
        card = registry.families[family].model_dump(mode="json", exclude_defaults=True)
        card["models"] = [*card["models"], entry]
        if like:
            raise CardError("--like is for a new family; an entry in an existing family takes that family's card")
        return Scaffold(card, entry, False, folder, [f"entry in the existing family {family} (its card decides the rest)"], review)

    liked = None
    if like is not None:
        if like not in registry.families:
            raise CardError(f"--like {like}: unknown family (known: {', '.join(sorted(registry.families))})")
        liked = registry.families[like]

    derived: list[str] = []
    config, loader, multimodal = facts.config, facts.loader, facts.multimodal
    import transformers

    if model_class:
        derived.append(f"model class {model_class} (given)")
    elif facts.model_class:
        model_class = facts.model_class
        derived += [n for n in facts.notes if n.startswith("model class ")]
    else:
        model_class = liked.model_class if liked else "AutoModelForCausalLM"
        derived.append(f"model class {model_class} ({'from --like ' + like if liked else 'config.json names none'})")
        review.append(f"{'no config.json' if not config else 'config.json names no architecture'}: "
                      f"model_class {model_class} is a guess")
    native = getattr(transformers, model_class, None) is not None
    remote = bool(facts.remote_code) and (not native or model_class.startswith("Auto"))
    if remote and trust_remote_code:
        derived.append(f"trust_remote_code: true (--trust-remote-code; the folder's remote code: {', '.join(facts.remote_code)})")
        review.append("the card trusts the folder's remote code: read it; if transformers has a native class now, "
                      "set model_class to that and drop trust_remote_code")
    elif remote or not native:
        review.append(
            f"{model_class} is remote code{' (' + ', '.join(facts.remote_code) + ')' if facts.remote_code else ''}, "
            "not run and not trusted by the card: give --trust-remote-code to use it (after reading it), or "
            "--model-class with the native transformers class (e.g. PhiForCausalLM for phi-2)"
        )
    derived += [n for n in facts.notes if n.startswith("loader ")]

    card: dict[str, Any] = {
        "family": family or model_id,
        "description": f"{model_id} (scaffolded by cardtune add-model from {source})",
        "status": "experimental",
        "status_note": "scaffolded by cardtune add-model; promote to supported after a training run",
        "model_class": model_class,
    }
    if loader != "generic":
        card["loader"] = loader
    if remote and trust_remote_code:
        card["trust_remote_code"] = True

    # tokenizer (as shipped, no fix-ups) for media tokens and special tokens
    from cardtune.loaders import LOADERS

    probe_card = FamilyCard.model_validate({  # the tokenizer as shipped: shared tokens are judged below
        **card, "models": [entry], "modules": {"llm": ["model"]}, "chat": {"special_tokens": {"allow_shared": True}},
    })
    tokenizer = LOADERS[loader](probe_card, folder).load_tokenizer()

    if multimodal:
        modalities = ["text", "image", "multi_image"]
        media, found = media_tokens(facts, tokenizer)
        if "video_token" in media:
            modalities.append("video")
            card["capabilities"] = {"video": "experimental"}
            review.append("video: the video token is known but video training is experimental until checked")
        card["modalities"] = modalities
        if loader == "qwen-vl":
            card["load_image"] = False
            media = {}
            derived.append("images are given by path in the prompt (the tokenizer reads the path): load_image false")
        else:
            derived += found
            if "image_token" not in media and liked is not None and liked.media.image_token:
                media["image_token"] = liked.media.image_token
                derived.append(f"image token {liked.media.image_token!r} from --like {like}")
            elif "image_token" not in media:
                review.append("no image token found in the processor, tokenizer, configs or template: set media.image_token")
        processor_class = read_json(folder / "preprocessor_config.json").get("processor_class")
        if processor_class and not read_json(folder / "processor_config.json").get("processor_class"):
            card["processor_class"] = processor_class
            derived.append(f"processor class {processor_class} (preprocessor_config.json)")
        if media:
            card["media"] = media
        derived.append(f"modalities {', '.join(modalities)}")

    # modules: the model on the meta device
    modules, how = module_keywords(facts, model_class, trust_remote_code=remote and trust_remote_code)
    if modules is not None:
        derived.append(how)
        if multimodal and not (modules.get("vision_encoder") and modules.get("vision_projector")):
            review.append(f"vision modules not told apart by name ({modules}): write modules by hand")
    elif liked is not None:
        modules = liked.modules.model_dump(exclude_defaults=True)
        derived.append(f"module keywords from --like {like} (the model cannot be built here: {how})")
        review.append(f"module keywords come from {like}: check them against the model's parameter names")
    elif not multimodal:
        modules = {"llm": ["model", "lm_head"]}
        derived.append(f"module keywords llm [model, lm_head] (the usual causal-LM layout; cannot build: {how})")
        review.append("module keywords are the usual causal-LM layout, not read off the model: check them")
    else:
        raise CardError(
            f"{folder}: the model cannot be built on the meta device ({how}), so its vision, "
            "projector and language-model modules are unknown; give --like FAMILY to take a family's "
            "keywords" + ("" if trust_remote_code or not remote else ", or --trust-remote-code to build it with its code")
            + ", or write the card by hand"
        )
    card["modules"] = {k: v for k, v in modules.items() if v}

    # special tokens
    fixups, said, special_review = recommend_special_tokens(tokenizer, folder)
    derived += said
    review += special_review

    # chat template: the folder's, else --like's
    chat: dict[str, Any] = {}
    if fixups:
        chat["special_tokens"] = fixups
    trial = FamilyCard.model_validate({**card, "chat": chat, "models": [entry]})
    ok, why = _template_renders(trial, folder)
    if ok:
        derived.append("chat template: the folder's own (it renders a conversation the engine can mask)")
    elif liked is not None:
        taken = liked.chat.model_dump(mode="json", exclude_defaults=True, include=set(_TEMPLATE_FIELDS))
        chat = {**taken, **chat}
        derived.append(f"chat template from --like {like} ({why})")
        review.append(f"the chat template is {like}'s: confirm the model was trained with that format")
    else:
        raise CardError(
            f"{folder}: {why}. cardtune cannot invent the format a model was trained with: give --like FAMILY "
            "to take a registered family's template (families with templates of their own: "
            f"{', '.join(sorted(f for f, c in registry.families.items() if c.chat.template in ('declarative', 'jinja')))}), "
            "or write chat.declarative (docs/TEMPLATES.md)"
        )
    if chat:
        card["chat"] = chat
    card["models"] = [entry]
    scaffold = Scaffold(card, entry, True, folder, derived, review)
    scaffold.validated()
    return scaffold


# -- writing ---------------------------------------------------------------------------------
def card_yaml(s: Scaffold, source: str) -> str:
    import yaml

    head = [
        f"# {s.family}: scaffolded by `cardtune add-model {source} --model_id {s.entry['model_id']}`.",
        "# What add-model derived:",
        *(f"#   - {line}" for line in s.derived),
    ]
    if s.review:
        head += ["# Review before a pull request:", *(f"#   - {line}" for line in s.review)]
    order = list(FamilyCard.model_fields)
    card = dict(sorted(s.card.items(), key=lambda kv: order.index(kv[0])))
    body = yaml.dump(card, Dumper=_CardDumper, sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(head) + "\n" + body


class _CardDumper(__import__("yaml").SafeDumper):
    """Block style, except lists of plain values in flow style (``llm: [model, lm_head]``)."""

    def represent_list(self, data: list[Any]) -> Any:
        flow = all(isinstance(x, (str, int, float, bool)) for x in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)  # list items indented under their key


_CardDumper.add_representer(list, _CardDumper.represent_list)


def entries_yaml(s: Scaffold, source: str) -> str:
    """An entries file: the new model id of family ``s.family``, whose card lives elsewhere."""
    head = [f"# Model ids of family {s.family} (its card: `cardtune show {s.entry['model_id']}`), added by",
            f"# `cardtune add-model {source} --model_id {s.entry['model_id']} --family {s.family}`."]
    body = {"family": s.family, "models": [s.entry]}
    import yaml

    return "\n".join(head) + "\n" + yaml.dump(body, Dumper=_CardDumper, sort_keys=False, allow_unicode=True, width=100)


def append_entry(path: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the ``models:`` list of the card file ``path``, keeping its comments."""
    import yaml

    text = path.read_text(encoding="utf-8")
    root = yaml.compose(text)
    node = next((v for k, v in root.value if k.value == "models"), None)
    if node is None or not isinstance(node, yaml.SequenceNode) or not node.value:
        raise CardError(f"{path}: no 'models' list to add an entry to")
    lines = text.splitlines(keepends=True)
    first = node.value[0]
    item_indent = " " * (first.start_mark.column - 2)
    key_indent = " " * first.start_mark.column
    end = node.value[-1].end_mark.line + (1 if node.value[-1].end_mark.column > 0 else 0)
    new = [f"{item_indent}- model_id: {entry['model_id']}\n", f"{key_indent}hf_path: {json.dumps(entry['hf_path'])}\n"]
    if end > 0 and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    path.write_text("".join(lines[:end] + new + lines[end:]), encoding="utf-8")
