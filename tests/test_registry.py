"""The model registry: built-in cards, lookups, freeze-lists on real model skeletons, broken cards.

Expected ids are read from the YAML files directly (an oracle independent of the registry code);
module names come from the real ``config.json`` fixtures built on the meta device (no weights).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import fixture_dir, require_fixture

from cardtune.registry import (
    BUILTIN_CARD_DIR,
    CARDS_ENV,
    CardError,
    FamilyCard,
    Registry,
    UnknownModelError,
    field_line,
    field_location,
    get_registry,
    load_card_file,
    parse_card,
    register_model,
)
from cardtune.registry import registry as registry_module

CARD_FILES = sorted(BUILTIN_CARD_DIR.glob("*.yaml"))
RAW_CARDS = {p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in CARD_FILES}
EXPECTED_IDS = [m["model_id"] for raw in RAW_CARDS.values() for m in raw["models"]]
COMPONENTS = ("vision_encoder", "vision_projector", "llm", "others")


@pytest.fixture(autouse=True)
def _no_user_cards(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own $CARDTUNE_CARDS must not change what these tests see."""
    monkeypatch.delenv(CARDS_ENV, raising=False)


@pytest.fixture(scope="module")
def builtin() -> Registry:
    registry = Registry()
    registry.load_dirs([BUILTIN_CARD_DIR])
    return registry


def write_card(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


TEXT_CARD = """
family: my-fam
model_class: LlamaForCausalLM
modules:
  llm: [model, lm_head]
models:
  - model_id: my-model
    hf_path: me/my-model
"""


# -- 1. built-in cards ---------------------------------------------------------------------------
def test_builtin_folder_holds_the_cards() -> None:
    assert len(CARD_FILES) >= 24
    assert len(EXPECTED_IDS) == len(set(EXPECTED_IDS)), "a model id is listed by two built-in cards"


@pytest.mark.parametrize("path", CARD_FILES, ids=lambda p: p.stem)
def test_every_builtin_card_loads(path: Path) -> None:
    card = load_card_file(path)
    assert isinstance(card, FamilyCard)
    assert card.family == path.stem, "configs/models/<family>.yaml: the file is named after its family"
    assert [m.model_id for m in card.models] == [m["model_id"] for m in RAW_CARDS[path.stem]["models"]]
    assert card.modules.llm, "every family names its language-model modules"


def test_registry_holds_exactly_the_ids_of_the_yaml_files(builtin: Registry) -> None:
    assert list(builtin.models) == EXPECTED_IDS
    assert sorted(builtin.families) == sorted(RAW_CARDS)


@pytest.mark.parametrize("model_id", EXPECTED_IDS)
def test_every_model_id_resolves(model_id: str) -> None:
    spec = get_registry().get(model_id)
    raw_family = next(f for f, raw in RAW_CARDS.items() if model_id in [m["model_id"] for m in raw["models"]])
    raw_entry = next(m for m in RAW_CARDS[raw_family]["models"] if m["model_id"] == model_id)
    assert spec.model_id == model_id
    assert spec.family_id == raw_family
    assert spec.hf_path == raw_entry["hf_path"]
    assert spec.source == str(BUILTIN_CARD_DIR / f"{raw_family}.yaml")


def test_unknown_id_lists_close_matches() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_registry().get("llava-1.5-7")
    assert str(info.value) == (
        "unknown model id 'llava-1.5-7' (close matches: llava-1.5-7b, llava-1.5-13b, llava-1.6-vicuna-7b, "
        "llava-1.6-mistral-7b, llava-1.6-vicuna-13b); `cardtune list` shows every registered id"
    )
    assert isinstance(info.value, KeyError)


def test_unknown_id_without_close_match() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_registry().get("zzzz")
    assert str(info.value) == "unknown model id 'zzzz'; `cardtune list` shows every registered id"


def test_get_registry_is_cached_per_folder_set(tmp_path: Path) -> None:
    assert get_registry() is get_registry()
    with_extra = get_registry([tmp_path])
    assert list(with_extra.models) == EXPECTED_IDS  # an empty user folder adds nothing
    assert get_registry([tmp_path]) is with_extra


def test_card_folder_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CardError) as info:
        get_registry([missing])
    assert str(info.value) == f"{missing}: card folder does not exist"


def test_resolved_defaults(builtin: Registry) -> None:
    card = builtin.get("llava-1.5-7b").family
    assert card.capabilities.lora == "supported"  # default
    assert card.capabilities.packing == "unsupported"  # set by the card
    assert card.chat.end_of_turn == ["</s>"]  # a single string becomes a list
    assert card.chat.system == "auto"
    assert card.loader == "generic" and card.collator == "default"
    assert card.media.image_token == "<image>" and card.media.num_frames == 8
    assert card.is_multimodal


# -- supported_models (the seeds' names) ----------------------------------------------------------
def test_supported_models_tables(builtin: Registry) -> None:
    from cardtune import supported_models as sm

    assert list(sm.MODEL_REGISTRY) == EXPECTED_IDS
    assert sm.MODEL_FAMILIES == {mid: spec.family_id for mid, spec in builtin.models.items()}
    assert sm.MODEL_HF_PATH["llava-1.5-7b"] == "llava-hf/llava-1.5-7b-hf"
    multimodal = {f for f, raw in RAW_CARDS.items() if set(raw.get("modalities", ["text"])) - {"text"}}
    assert set(sm.MULTIMODAL_KEYWORDS) == multimodal
    assert sm.MULTIMODAL_KEYWORDS["llava-1.5"] == ["vision_tower", "multi_modal_projector"]
    assert sm.MULTIMODAL_KEYWORDS["qwen2-vl"] == [
        "visual.patch_embed",
        "visual.rotary_pos_emb",
        "visual.blocks",
        "visual.merger",
    ]


# -- 2. freeze-lists ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(RAW_CARDS))
def test_freeze_lists_present(builtin: Registry, family: str) -> None:
    card = builtin.families[family]
    if card.is_multimodal:
        assert card.modules.vision_encoder and card.modules.vision_projector and card.modules.llm
        assert card.multimodal_keywords == [*card.modules.vision_encoder, *card.modules.vision_projector]
    else:
        assert card.modules.llm and not card.modules.vision_encoder and not card.modules.vision_projector


def dotted_runs(name: str) -> set[str]:
    """Every run of consecutive dotted parts: a keyword matches a name when it is one of these."""
    parts = name.split(".")
    return {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)}


def test_dotted_run_matching_rule() -> None:
    assert "visual.merger" in dotted_runs("model.visual.merger.mlp.0.weight")
    assert "model" in dotted_runs("model.layers.0.self_attn.q_proj.weight")
    assert "visual.merge" not in dotted_runs("model.visual.merger.mlp.0.weight")  # whole parts only
    assert "model.merger" not in dotted_runs("model.visual.merger.mlp.0.weight")  # consecutive only


def check_keywords_against(card: FamilyCard, model) -> None:
    """Every keyword matches a parameter or module; components claim disjoint parameters, all of them."""
    params = [n for n, _ in model.named_parameters()]
    names = params + [n for n, _ in model.named_modules() if n]
    runs = {n: dotted_runs(n) for n in names}
    claimed: dict[str, set[str]] = {}
    for component in COMPONENTS:
        claimed[component] = set()
        for keyword in getattr(card.modules, component):
            hits = [n for n in names if keyword in runs[n]]
            assert hits, (
                f"{card.family}: modules.{component} keyword '{keyword}' matches no parameter or module"
            )
            claimed[component] |= {n for n in params if keyword in runs[n]}
    vision = claimed["vision_encoder"] | claimed["vision_projector"]
    assert not vision & claimed["llm"], (
        f"vision and llm keywords both match {sorted(vision & claimed['llm'])[:3]}"
    )
    for i, a in enumerate(COMPONENTS):
        for b in COMPONENTS[i + 1 :]:
            assert not claimed[a] & claimed[b], (
                f"{a} and {b} both match {sorted(claimed[a] & claimed[b])[:3]}"
            )
    unclaimed = [n for n in params if not any(n in c for c in claimed.values())]
    assert not unclaimed, f"{card.family}: parameters no component names: {unclaimed[:5]}"


def _fixture_configs() -> list[str]:
    """Registered ids whose fixture folder has a config.json that loads without remote code."""
    ids = []
    for model_id, spec in get_registry().models.items():
        folder = fixture_dir(model_id)
        if folder is None or not (folder / "config.json").is_file() or spec.family.trust_remote_code:
            continue
        if "auto_map" in json.loads((folder / "config.json").read_text()):
            continue  # a remote-code revision of a natively supported model: see the phi-2 test
        ids.append(model_id)
    return ids


FIXTURE_CONFIG_IDS = _fixture_configs()


def test_fixture_configs_cover_the_vlms(fixtures_present: Path) -> None:
    """The parametrised test below must not shrink silently when the fixture discovery changes."""
    assert {
        "llama-2-7b-chat",
        "llava-1.5-7b",
        "llava-interleave-qwen-7b",
        "mistral-7b-instruct-v0.2",
        "mistral-7b-instruct-v0.3",
        "qwen2-vl-2b",
        "qwen2.5-7b-instruct",
        "qwen2.5-vl-3b-instruct",
        "vicuna-7b-v1.5",
    } <= set(FIXTURE_CONFIG_IDS)


@pytest.mark.parametrize("model_id", FIXTURE_CONFIG_IDS)
def test_freeze_keywords_match_the_real_model(model_id: str) -> None:
    import torch
    import transformers

    folder = require_fixture(model_id)
    card = get_registry().get(model_id).family
    config = transformers.AutoConfig.from_pretrained(folder)
    assert card.model_class in (config.architectures or []), f"the real config names {config.architectures}"
    with torch.device("meta"):
        model = getattr(transformers, card.model_class)._from_config(config)
    check_keywords_against(card, model)


def test_qwen2_vl_2b_fixture_is_the_base_model(builtin: Registry) -> None:
    require_fixture("qwen2-vl-2b")
    assert builtin.get("qwen2-vl-2b").family_id == "qwen2-vl-base"


def test_phi2_fixture_is_the_remote_code_revision() -> None:
    """The only fixture config excluded above: phi-2's Dec-2023 MixFormer config needs remote code.

    The card (PhiForCausalLM, no remote code) describes today's hub revision; its keywords are
    checked on the native class below.
    """
    import transformers

    folder = require_fixture("phi-2")
    excluded = {
        mid
        for mid, spec in get_registry().models.items()
        if (d := fixture_dir(mid)) is not None
        and (d / "config.json").is_file()
        and not spec.family.trust_remote_code
        and mid not in FIXTURE_CONFIG_IDS
    }
    assert excluded == {"phi-2"}
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mixformer-sequential"
    with pytest.raises(ValueError, match="custom code"):
        transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)


NATIVE_FAMILIES = sorted(f for f, raw in RAW_CARDS.items() if not raw.get("trust_remote_code", False))


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_freeze_keywords_match_the_model_class(builtin: Registry, family: str) -> None:
    """Families without a usable fixture config too: the model class built from its default config."""
    import torch
    import transformers

    card = builtin.families[family]
    cls = getattr(transformers, card.model_class)
    with torch.device("meta"):
        model = cls._from_config(cls.config_class())
    check_keywords_against(card, model)


def test_keyword_that_matches_nothing_is_caught() -> None:
    """The check above is not vacuous: a keyword naming a partial module name fails it."""
    import torch
    import transformers

    card = parse_card(
        TEXT_CARD.replace("llm: [model, lm_head]", "llm: [model, lm_hea]"),
        "t.yaml",
    )
    config = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=2
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(config)
    with pytest.raises(AssertionError, match="'lm_hea' matches no parameter or module"):
        check_keywords_against(card, model)


# -- 3. broken cards ------------------------------------------------------------------------------
# (file text, expected error with {p} for the file's path); every one of these names file, line, field.
BROKEN = {
    "unknown_top_key": (
        TEXT_CARD.replace(
            "model_class: LlamaForCausalLM\n", "model_class: LlamaForCausalLM\ndescriptoin: x\n"
        ),
        "{p}:3: descriptoin: unknown key",
    ),
    "unknown_nested_key": (
        TEXT_CARD.replace("models:", 'chat:\n  system: fold\n  endof_turn: "</s>"\nmodels:'),
        "{p}:7: chat.endof_turn: unknown key",
    ),
    "unknown_key_in_model_entry": (
        TEXT_CARD + "  - model_id: other\n    hf_pth: me/other\n",
        "{p}:8: models[1].hf_path: required field is missing\n{p}:9: models[1].hf_pth: unknown key",
    ),
    "missing_family": (
        TEXT_CARD.replace("family: my-fam\n", ""),
        "{p}:1: family: required field is missing",
    ),
    "trust_remote_code_maybe": (
        TEXT_CARD.replace("modules:", "trust_remote_code: maybe\nmodules:"),
        "{p}:3: trust_remote_code: input should be a valid boolean, unable to interpret input, got 'maybe'",
    ),
    "models_is_a_number": (
        TEXT_CARD.split("models:")[0] + "models: 3\n",
        "{p}:5: models: input should be a valid list, got 3",
    ),
    "bad_capability_state": (
        TEXT_CARD.replace("models:", "capabilities: {lora: maybe}\nmodels:"),
        "{p}:5: capabilities.lora: expected one of 'supported', 'experimental' or 'unsupported', got 'maybe'",
    ),
    "bad_modality": (
        TEXT_CARD.replace("models:", "modalities: [text, audio]\nmodels:"),
        "{p}:5: modalities[1]: expected one of 'text', 'image', 'multi_image' or 'video', got 'audio'",
    ),
    "bad_model_id": (
        TEXT_CARD.replace("model_id: my-model", "model_id: My Model"),
        "{p}:6: models[0].model_id: a model id is lowercase letters, digits, '.', '_' or '-', e.g. 'llava-1.5-7b'",
    ),
    "jinja_without_text": (
        TEXT_CARD.replace("models:", "chat:\n  template: jinja\nmodels:"),
        "{p}:5: chat: template: jinja needs the template text in 'jinja'",
    ),
    "invalid_yaml_unclosed_list": (
        TEXT_CARD.replace("[model, lm_head]", "[model, lm_head"),
        "{p}:5: not valid YAML: expected ',' or ']', but got ':'",
    ),
    "invalid_yaml_bad_indent": (
        TEXT_CARD.replace("model_class:", "  model_class:"),
        "{p}:2: not valid YAML: mapping values are not allowed here",
    ),
    "text_card_without_llm_keywords": (
        TEXT_CARD.replace("  llm: [model, lm_head]\n", "  others: [x]\n"),
        "{p}:3: modules: a text family needs module keywords for llm",
    ),
    "multimodal_card_without_vision_keywords": (
        TEXT_CARD.replace("modules:", "modalities: [text, image]\nmodules:"),
        "{p}:4: modules: a multimodal family needs module keywords for vision_encoder, vision_projector",
    ),
    "multimodal_card_without_modules": (
        TEXT_CARD.replace("modules:\n  llm: [model, lm_head]\n", "modalities: [text, image]\n"),
        "{p}:1: modules: a multimodal family needs module keywords for vision_encoder, vision_projector, llm",
    ),
    "modalities_without_text": (
        TEXT_CARD.replace("modules:", "modalities: [image]\nmodules:"),
        "{p}:3: modalities: must include 'text'",
    ),
    "video_capability_without_video_modality": (
        TEXT_CARD.replace("models:", "capabilities:\n  lora: supported\n  video: experimental\nmodels:"),
        "{p}:7: capabilities.video: 'experimental' needs 'video' in modalities (or set it to 'unsupported')",
    ),
    "video_capability_in_a_flow_mapping": (
        TEXT_CARD.replace("models:", "capabilities: {video: supported}\nmodels:"),
        "{p}:5: capabilities.video: 'supported' needs 'video' in modalities (or set it to 'unsupported')",
    ),
    "model_listed_twice": (
        TEXT_CARD
        + "  - model_id: other\n    hf_path: me/other\n  - model_id: my-model\n    hf_path: me/again\n",
        "{p}:10: models[2].model_id: model id 'my-model' is listed twice (first as models[0])",
    ),
    "not_a_mapping": (
        "- family: my-fam\n",
        "{p}:1: a card is a mapping with 'family', 'model_class' and 'models'",
    ),
    "empty_file": ("", "{p}:1: a card is a mapping with 'family', 'model_class' and 'models'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_card_exact_error(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    path = write_card(tmp_path, "bad.yaml", text)
    with pytest.raises(CardError) as by_file:
        load_card_file(path)
    assert str(by_file.value) == expected.format(p=path)
    with pytest.raises(CardError) as by_text:
        parse_card(path.read_text(), "somewhere.yaml")
    assert str(by_text.value) == expected.format(p="somewhere.yaml")


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_card_stops_load_dirs(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    path = write_card(tmp_path, "bad.yaml", text)
    with pytest.raises(CardError) as info:
        Registry().load_dirs([tmp_path, BUILTIN_CARD_DIR])
    assert str(info.value) == expected.format(p=path)
    with pytest.raises(CardError):
        get_registry([tmp_path])


def test_unknown_key_with_a_block_value_names_the_key(tmp_path: Path) -> None:
    path = write_card(tmp_path, "bad.yaml", TEXT_CARD.replace("modules:", "modles:"))
    with pytest.raises(CardError) as info:
        load_card_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and message.endswith(": modles: unknown key")
    assert "\n" not in message


def test_unknown_key_with_a_block_value_points_at_the_key_line(tmp_path: Path) -> None:
    path = write_card(tmp_path, "bad.yaml", TEXT_CARD.replace("modules:", "modles:"))
    with pytest.raises(CardError) as info:
        load_card_file(path)
    assert str(info.value).startswith(f"{path}:3: modles: unknown key")


def test_duplicate_model_id_across_user_cards(tmp_path: Path) -> None:
    a = write_card(tmp_path, "a.yaml", TEXT_CARD.replace("my-fam", "fam-a"))
    b = write_card(tmp_path, "b.yaml", TEXT_CARD.replace("my-fam", "fam-b"))
    with pytest.raises(CardError) as info:
        Registry().load_dirs([tmp_path, BUILTIN_CARD_DIR])
    assert str(info.value) == f"{b}:6: models[0].model_id: model id 'my-model' is already defined in {a}:6"


def test_duplicate_model_id_names_the_entry_of_each_card(tmp_path: Path) -> None:
    """Not the first entry of either card: the lines are those of the two clashing entries."""
    a = write_card(
        tmp_path, "a.yaml", TEXT_CARD.replace("my-fam", "fam-a") + "  - model_id: shared\n    hf_path: me/a\n"
    )
    b = write_card(
        tmp_path,
        "b.yaml",
        "# a comment\n"
        + TEXT_CARD.replace("my-fam", "fam-b").replace("my-model", "mine-b").lstrip("\n")
        + "  - model_id: other\n    hf_path: me/o\n  - model_id: shared\n    hf_path: me/b\n",
    )
    with pytest.raises(CardError) as info:
        Registry().load_dirs([tmp_path])
    assert str(info.value) == f"{b}:11: models[2].model_id: model id 'shared' is already defined in {a}:8"


def test_duplicate_of_a_builtin_model_id_names_the_user_card(tmp_path: Path) -> None:
    """User folders are read first, yet the error is about the user's card, not the built-in one."""
    mine = write_card(
        tmp_path, "mine.yaml", TEXT_CARD + "  - model_id: llava-1.5-13b\n    hf_path: me/mine\n"
    )
    builtin_file = BUILTIN_CARD_DIR / "llava-1.5.yaml"
    line = field_line(builtin_file, "models[1].model_id")
    assert builtin_file.read_text().splitlines()[line - 1].strip() == "- model_id: llava-1.5-13b"
    expected = (
        f"{mine}:8: models[1].model_id: model id 'llava-1.5-13b' is already defined in {builtin_file}:{line}"
    )
    with pytest.raises(CardError) as info:
        Registry().load_dirs([tmp_path, BUILTIN_CARD_DIR])
    assert str(info.value) == expected
    with pytest.raises(CardError) as info:
        get_registry([tmp_path])
    assert str(info.value) == expected
    with pytest.raises(CardError) as info:  # the same whichever folder is read first
        Registry().load_dirs([BUILTIN_CARD_DIR, tmp_path])
    assert str(info.value) == expected


def test_duplicate_of_a_builtin_family_names_the_user_card(tmp_path: Path) -> None:
    mine = write_card(
        tmp_path, "mine.yaml", "# my copy\n" + TEXT_CARD.replace("my-fam", "llava-1.5").lstrip("\n")
    )
    builtin_file = BUILTIN_CARD_DIR / "llava-1.5.yaml"
    line = field_line(builtin_file, "family")
    assert builtin_file.read_text().splitlines()[line - 1] == "family: llava-1.5"
    expected = f"{mine}:2: family: family 'llava-1.5' is already defined in {builtin_file}:{line}"
    for dirs in ([tmp_path, BUILTIN_CARD_DIR], [BUILTIN_CARD_DIR, tmp_path]):
        with pytest.raises(CardError) as info:
            Registry().load_dirs(dirs)
        assert str(info.value) == expected


def test_duplicate_family_across_user_cards(tmp_path: Path) -> None:
    a = write_card(tmp_path, "a.yaml", TEXT_CARD)
    b = write_card(tmp_path, "b.yaml", TEXT_CARD.replace("my-model", "other"))
    with pytest.raises(CardError) as info:
        Registry().load_dirs([tmp_path])
    assert str(info.value) == f"{b}:1: family: family 'my-fam' is already defined in {a}:1"


def test_a_clashing_card_adds_nothing(tmp_path: Path) -> None:
    """add_family is all or nothing: a clash on its second model id leaves no trace of the card."""
    write_card(tmp_path, "a.yaml", TEXT_CARD.replace("my-model", "second"))
    registry = Registry()
    registry.load_dirs([tmp_path])
    text = TEXT_CARD.replace("my-fam", "fam-b") + "  - model_id: second\n    hf_path: me/b\n"
    with pytest.raises(CardError, match="model id 'second' is already defined in"):
        registry.add_family(parse_card(text, "b.yaml"), "b.yaml")
    assert list(registry.families) == ["my-fam"] and list(registry.models) == ["second"]


def test_field_location_of_a_family(tmp_path: Path) -> None:
    path = write_card(
        tmp_path, "my-fam.yaml", TEXT_CARD.replace("models:", "loader: nope\ncollator: nah\nmodels:")
    )
    registry = Registry()
    registry.load_dirs([tmp_path])
    assert registry.field_location("my-fam", "loader") == f"{path}:5"
    assert registry.field_location("my-fam", "collator") == f"{path}:6"
    assert registry.field_location("my-fam", "models[0].hf_path") == f"{path}:9"
    assert registry.field_location("my-fam", ("modules", "llm")) == f"{path}:4"
    assert (
        registry.field_location("my-fam", "modules.vision_encoder") == f"{path}:3"
    )  # not written: its parent
    assert registry.field_location("my-fam", "processor_class") == f"{path}:1"  # not written, at the top
    other = TEXT_CARD.replace("my-fam", "py-fam").replace("my-model", "p")
    registry.add_family(parse_card(other, "from a string"))
    assert registry.field_location("py-fam", "loader") == "<python>"


def test_field_line_without_a_file(tmp_path: Path) -> None:
    assert field_line(tmp_path / "nope.yaml", "loader") is None
    assert field_line("<python>", "loader") is None
    assert field_location("<python>", "loader") == "<python>"


# -- 5. user cards and register_model -------------------------------------------------------------
def test_user_card_folder_adds_a_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_card(tmp_path, "my-fam.yaml", TEXT_CARD)
    spec = get_registry([tmp_path]).get("my-model")
    assert spec.family_id == "my-fam" and spec.source == str(tmp_path / "my-fam.yaml")
    monkeypatch.setenv(CARDS_ENV, str(tmp_path))
    assert get_registry().get("my-model").hf_path == "me/my-model"
    assert get_registry().get("llava-1.5-7b").family_id == "llava-1.5"  # built-ins still there


def test_yml_extension_is_read(tmp_path: Path) -> None:
    write_card(tmp_path, "my-fam.yml", TEXT_CARD)
    assert get_registry([tmp_path]).get("my-model").family_id == "my-fam"


def test_register_model_on_a_fresh_registry(builtin: Registry) -> None:
    registry = Registry()
    registry.load_dirs([BUILTIN_CARD_DIR])
    spec = registry.register_model("my-llava", "llava-1.5", "me/my-llava")
    assert registry.get("my-llava") is spec
    assert spec.family is registry.families["llava-1.5"]
    assert spec.hf_path == "me/my-llava" and spec.source == "<python>"
    assert "my-llava" not in builtin.models and "my-llava" not in get_registry().models


def test_register_model_config_overrides_merge_over_the_family(tmp_path: Path) -> None:
    write_card(
        tmp_path, "my-fam.yaml", TEXT_CARD.replace("models:", "config_overrides: {a: 1, b: 2}\nmodels:")
    )
    registry = Registry()
    registry.load_dirs([tmp_path])
    assert registry.get("my-model").config_overrides == {"a": 1, "b": 2}
    spec = registry.register_model("other", "my-fam", "me/other", config_overrides={"b": 3}, revision="v1")
    assert spec.config_overrides == {"a": 1, "b": 3} and spec.revision == "v1"


def test_register_model_unknown_family(tmp_path: Path) -> None:
    for family in ("llava-1.5", "llava-1.6", "qwen2-vl"):
        write_card(
            tmp_path, f"{family}.yaml", TEXT_CARD.replace("my-fam", family).replace("my-model", family + "-x")
        )
    registry = Registry()
    registry.load_dirs([tmp_path])
    with pytest.raises(CardError) as info:
        registry.register_model("my-llava", "llava-15", "me/my-llava")
    assert (
        str(info.value)
        == "<python>: model 'my-llava' names unknown family 'llava-15' (close matches: llava-1.5, llava-1.6)"
    )
    with pytest.raises(CardError) as info:
        registry.register_model("my-llava", "zzz", "me/my-llava")
    assert str(info.value) == "<python>: model 'my-llava' names unknown family 'zzz'"
    assert "my-llava" not in registry.models


def test_register_model_unknown_family_among_the_builtins() -> None:
    registry = Registry()
    registry.load_dirs([BUILTIN_CARD_DIR])
    with pytest.raises(CardError) as info:
        registry.register_model("my-llava", "llava-15", "me/my-llava")
    assert str(info.value).startswith(
        "<python>: model 'my-llava' names unknown family 'llava-15' (close matches: llava-1.5, llava-1.6, "
    )


def test_register_model_duplicate_id(builtin: Registry) -> None:
    registry = Registry()
    registry.load_dirs([BUILTIN_CARD_DIR])
    with pytest.raises(CardError) as info:
        registry.register_model("llava-1.5-7b", "llava-1.5", "me/x")
    builtin_file = BUILTIN_CARD_DIR / "llava-1.5.yaml"
    assert str(info.value) == (
        "<python>: model_id: model id 'llava-1.5-7b' is already defined in "
        f"{builtin_file}:{field_line(builtin_file, 'models[0].model_id')}"
    )
    assert registry.get("llava-1.5-7b").hf_path == "llava-hf/llava-1.5-7b-hf"


def test_register_model_checks_the_id_shape() -> None:
    """The card schema's model-id rule, with the schema's message."""
    registry = Registry()
    registry.load_dirs([BUILTIN_CARD_DIR])
    with pytest.raises(CardError) as info:
        registry.register_model("My Model", "llava-1.5", "me/x")
    assert str(info.value) == (
        "<python>: model_id: a model id is lowercase letters, digits, '.', '_' or '-', e.g. 'llava-1.5-7b'"
    )
    assert str(info.value).split("model_id: ")[1] == BROKEN["bad_model_id"][1].split("model_id: ")[1]
    assert "My Model" not in registry.models


def test_register_model_checks_the_entry_like_a_card() -> None:
    registry = Registry()
    registry.load_dirs([BUILTIN_CARD_DIR])
    with pytest.raises(CardError) as info:
        registry.register_model("my-llava", "llava-1.5", None)  # type: ignore[arg-type]
    assert str(info.value) == "<python>: hf_path: input should be a valid string, got None"
    assert "my-llava" not in registry.models


def test_register_model_twice_from_python() -> None:
    registry = Registry()
    registry.load_dirs([BUILTIN_CARD_DIR])
    registry.register_model("my-llava", "llava-1.5", "me/my-llava")
    with pytest.raises(CardError) as info:
        registry.register_model("my-llava", "llava-1.6", "me/other")
    assert str(info.value) == "<python>: model_id: model id 'my-llava' is already defined in <python>"
    assert registry.get("my-llava").hf_path == "me/my-llava"


# -- the default registries: one per folder set, each with every register_model() ---------------
@pytest.fixture
def fresh_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Module-level register_model() changes the process's registries: start these tests from
    none, and leave none behind for the other tests."""
    monkeypatch.setattr(registry_module, "_CACHE", {})
    monkeypatch.setattr(registry_module, "_REGISTERED", [])


def test_get_registry_keeps_each_folder_set(tmp_path: Path, fresh_defaults: None) -> None:
    write_card(tmp_path, "my-fam.yaml", TEXT_CARD)
    default = get_registry()
    with_mine = get_registry([tmp_path])
    assert with_mine is not default and "my-model" in with_mine.models
    assert get_registry() is default and "my-model" not in default.models
    assert get_registry([tmp_path]) is with_mine


def test_register_model_survives_a_cards_lookup(tmp_path: Path, fresh_defaults: None) -> None:
    from cardtune import supported_models as sm

    write_card(tmp_path, "my-fam.yaml", TEXT_CARD)
    default = get_registry()
    register_model("before", "llava-1.5", "me/before")
    get_registry([tmp_path])  # a --cards command
    register_model("after", "qwen2-vl", "me/after")
    assert get_registry() is default
    assert list(default.models)[-2:] == ["before", "after"]
    assert list(sm.MODEL_REGISTRY) == [*EXPECTED_IDS, "before", "after"]
    assert sm.MODEL_REGISTRY["before"] is default.models["before"]
    assert (sm.MODEL_FAMILIES["before"], sm.MODEL_FAMILIES["after"]) == ("llava-1.5", "qwen2-vl")
    assert (sm.MODEL_HF_PATH["before"], sm.MODEL_HF_PATH["after"]) == ("me/before", "me/after")
    # The registry of the other folders has them too, after its own cards.
    with_mine = get_registry([tmp_path])
    assert list(with_mine.models) == ["my-model", *EXPECTED_IDS, "before", "after"]
    assert with_mine.get("after").source == "<python>"
    assert with_mine.get("after").family is with_mine.families["qwen2-vl"]


def test_register_model_of_a_user_family(tmp_path: Path, monkeypatch, fresh_defaults: None) -> None:
    """With $CARDTUNE_CARDS set, the default registry holds the user's families: a model of one
    registers, and shows in the seed tables."""
    from cardtune import supported_models as sm

    write_card(tmp_path, "my-fam.yaml", TEXT_CARD)
    monkeypatch.setenv(CARDS_ENV, str(tmp_path))
    register_model("mine-2", "my-fam", "me/mine-2")
    assert sm.MODEL_FAMILIES["mine-2"] == "my-fam" and sm.MODEL_FAMILIES["my-model"] == "my-fam"


def test_register_model_errors_register_nothing(fresh_defaults: None) -> None:
    from cardtune import supported_models as sm

    builtin_file = BUILTIN_CARD_DIR / "llava-1.5.yaml"
    with pytest.raises(CardError) as info:
        register_model("My Model", "llava-1.5", "me/x")
    assert str(info.value).startswith("<python>: model_id: a model id is lowercase letters")
    with pytest.raises(CardError, match="names unknown family 'llava-15'"):
        register_model("my-llava", "llava-15", "me/x")
    with pytest.raises(CardError) as info:
        register_model("llava-1.5-7b", "llava-1.5", "me/x")
    assert str(info.value) == (
        "<python>: model_id: model id 'llava-1.5-7b' is already defined in "
        f"{builtin_file}:{field_line(builtin_file, 'models[0].model_id')}"
    )
    assert list(sm.MODEL_REGISTRY) == EXPECTED_IDS
    assert registry_module._REGISTERED == []
