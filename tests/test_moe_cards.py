"""``modules.llm_mlp`` in the cards, checked on meta-device models built from the real fixture
configs; the MoE recipes and options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from test_registry import FIXTURE_CONFIG_IDS, TEXT_CARD, write_card

from cardtune.registry import CardError, get_registry, load_card_file
from cardtune.training.arguments import RECIPE_DIR, ArgumentError, parse_arguments
from cardtune.training.moe import find_ffns

# No card names the FFN of these: remote code whose modelling files are not in the fixtures
# (or not there at all), or a native class with no fixture config to build it from.
# A family whose FFN is a mixture of experts already has nothing to upcycle.
ALREADY_MIXTURES = {"gpt-oss"}
WITHOUT_LLM_MLP = {"gemma-it", "phi-3-mini", "stablelm-2-chat", "internlm-chat", "internlm2-chat", "xverse-chat",
                   "qwen-vl", "phi3-v", *ALREADY_MIXTURES}


def check_ffns(card, model) -> None:
    """One FFN per decoder layer of the language model, each holding linear layers, none in
    the vision tower."""
    ffns = find_ffns(model, card)
    text = model.config.get_text_config()
    assert [layer for layer, _ in ffns] == list(range(text.num_hidden_layers)), card.family
    for _, name in ffns:
        assert not any(k in name.split(".") for k in card.multimodal_keywords), name
        assert any(isinstance(m, torch.nn.Linear) for m in model.get_submodule(name).modules()), name


# Fixture folders named after no registered id, and the family whose card describes them.
UNNAMED_FIXTURES = {"llava-v1.6-mistral-7b-hf": "llava-1.6", "llava-onevision-qwen2-0.5b-ov-hf": "llava-onevision"}


def test_the_cards_that_name_their_ffn() -> None:
    families = get_registry().families
    assert {f for f, card in families.items() if not card.modules.llm_mlp} == WITHOUT_LLM_MLP
    verified = {get_registry().get(m).family.model_class for m in FIXTURE_CONFIG_IDS}
    verified |= {families[f].model_class for f in UNNAMED_FIXTURES.values()}
    verified |= {families[f].model_class for f in TEXT_SIZES_OF}
    for family, card in families.items():
        if card.modules.llm_mlp and family not in ("phi-2", "tiny-llava-demo"):
            assert card.model_class in verified, family  # its class is built below from a fixture config


@pytest.mark.parametrize("model_id", [*FIXTURE_CONFIG_IDS, *UNNAMED_FIXTURES])
def test_llm_mlp_finds_every_layer_of_the_real_model(model_id: str) -> None:
    from conftest import require_fixture

    family = UNNAMED_FIXTURES.get(model_id)
    card = get_registry().families[family] if family else get_registry().get(model_id).family
    config = transformers.AutoConfig.from_pretrained(require_fixture(model_id))
    assert getattr(transformers, card.model_class).config_class is type(config)
    with torch.device("meta"):
        model = getattr(transformers, card.model_class)._from_config(config)
    if card.family in ALREADY_MIXTURES:
        from cardtune.loaders.discover import discover_modules

        layers = config.get_text_config().num_hidden_layers
        mixtures = [n for n, m in model.named_modules() if n.endswith(".mlp") and hasattr(m, "experts")]
        assert len(mixtures) == layers and "llm_mlp" not in {k for k, v in discover_modules(model).items() if v}
        return
    check_ffns(card, model)


# Text-only families whose decoder is a vision family's language model: built from the text_config
# of that family's fixture (Gemma 3's 1B is Gemma3ForCausalLM on a Gemma3TextConfig).
TEXT_SIZES_OF = {"gemma-3-text-it": "gemma-3-4b-it"}


@pytest.mark.parametrize("family", list(TEXT_SIZES_OF))
def test_llm_mlp_of_a_text_size_built_from_its_vision_siblings_text_config(family: str) -> None:
    from conftest import require_fixture

    card = get_registry().families[family]
    config = transformers.AutoConfig.from_pretrained(require_fixture(TEXT_SIZES_OF[family])).get_text_config()
    assert getattr(transformers, card.model_class).config_class is type(config)
    with torch.device("meta"):
        model = getattr(transformers, card.model_class)._from_config(config)
    check_ffns(card, model)


def test_llm_mlp_of_phi_2_and_the_demo() -> None:
    """phi-2's fixture config is the remote-code revision: PhiForCausalLM is built from phi-2's
    numbers; the demo's model is the folder cardtune builds."""
    import json

    from conftest import require_fixture

    from cardtune.demo import ensure_demo_model

    phi2 = json.loads((require_fixture("phi-2") / "config.json").read_text())
    config = transformers.PhiConfig(vocab_size=phi2["vocab_size"], hidden_size=phi2["n_embd"],
                                    num_hidden_layers=phi2["n_layer"], num_attention_heads=phi2["n_head"])
    demo = transformers.AutoConfig.from_pretrained(ensure_demo_model())  # built (once) off the meta device
    with torch.device("meta"):
        check_ffns(get_registry().get("phi-2").family, transformers.PhiForCausalLM(config))
        check_ffns(get_registry().get("tiny-llava-demo").family, transformers.LlavaForConditionalGeneration(demo))


@pytest.mark.parametrize(("line", "expected"), [
    ("  llm_mlp: [vision_tower]\n", "{p}:8: modules.llm_mlp[0]: 'vision_tower' is also a vision keyword"),
    ("  llm_mlp: [layers.*.mlp]\n", "{p}:8: modules.llm_mlp[0]: 'layers.*.mlp': a module name or dotted run of "
                                    "names, e.g. 'mlp'"),
])
def test_a_wrong_llm_mlp_fails_cardtune_check(tmp_path: Path, line: str, expected: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.cli import main

    text = TEXT_CARD.replace("  llm: [model, lm_head]\n", "  llm: [model, lm_head]\n  vision_encoder: [vision_tower]\n"
                             "  vision_projector: [mm]\n" + line).replace("modules:", "modalities: [text, image]\nmodules:")
    path = write_card(tmp_path, "bad.yaml", text)
    with pytest.raises(CardError) as info:
        load_card_file(path)
    assert str(info.value) == expected.format(p=path)
    assert main(["check", "--cards", str(tmp_path)]) == 1
    assert expected.format(p=path) in capsys.readouterr().err


# -- recipes and options --------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_recipes_open_with_their_commands(stage: int) -> None:
    path = RECIPE_DIR / "moe-llava" / f"stage{stage}.yaml"
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# python train.py --config configs/train/moe-llava/stage{stage}.yaml --data_path ")
    assert lines[1] == f"# demo: python train.py --model_id tiny-llava-demo --config configs/train/moe-llava/stage{stage}.yaml"
    args = parse_arguments(["--config", str(path), "--data_path", "d.json"])
    assert args.training.output_dir == f"out/moe-llava/stage{stage}"
    if stage > 1:
        assert args.model.model_path == f"out/moe-llava/stage{stage - 1}"  # the previous stage's folder
    assert (args.model.template == "plain") == (stage == 1) and not args.tune.use_lora
    m = args.moe
    if stage == 3:
        assert (m.moe_layers, m.moe_num_experts, m.moe_top_k, m.router_aux_loss_coef, m.moe_train) == (
            "sparse", "4", 2, 0.01, "only_moe")
        assert m.moe_capacity_factor is None and args.sources["moe_layers"] == str(path)
    else:
        assert m.moe_layers is None


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_moe_section_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "moe:\n  layers: sparse\n  topk: 2\n")
    with pytest.raises(ArgumentError) as info:
        parse_arguments(["--model_id", "llava-1.5-7b", "--config", str(path)])
    assert str(info.value).startswith(f"{path}: moe.topk: Extra inputs are not permitted (known: layers, num_experts, ")
    path = _recipe(tmp_path, "moe:\n  layers: odd\n")
    with pytest.raises(ArgumentError, match="one of sparse, dense, first_half, second_half, or layer indices"):
        parse_arguments(["--model_id", "llava-1.5-7b", "--config", str(path)])
    path = _recipe(tmp_path, "moe_top_k: 1\nmoe:\n  layers: [0, 2]\n  top_k: 2\n")
    with pytest.raises(ArgumentError, match=f"^{path}: moe_top_k given both flat and in the moe: section$"):
        parse_arguments(["--model_id", "llava-1.5-7b", "--config", str(path)])
    path = _recipe(tmp_path, "moe:\n  layers: [0, 2]\n  num_experts: [4, 8]\n  capacity_factor: 1.5\n")
    args = parse_arguments(["--model_id", "llava-1.5-7b", "--config", str(path), "--moe_top_k", "1"])
    assert (args.moe.moe_layers, args.moe.moe_num_experts, args.moe.moe_capacity_factor, args.moe.moe_top_k) == (
        "0,2", "4,8", 1.5, 1)


@pytest.mark.parametrize(("argv", "message"), [
    (["--moe_top_k", "1"], "--moe_top_k: MoE options, but no --moe_layers (sparse, dense, first_half, second_half "
                           "or indices) says which layers"),
    (["--moe_layers", "sparse", "--moe_top_k", "5"], "--moe_top_k 5: between 1 and the experts of a layer (4)"),
    (["--moe_layers", "sparse", "--moe_num_experts", "4,1"], "--moe_num_experts 4,1: a mixture needs at least 2 "
                                                             "experts per layer"),
    (["--moe_layers", "sparse", "--use_lora"], "--moe_train only_moe trains the experts and routers in full; for "
                                               "adapters use --moe_train lora (experts) or --moe_train all --use_lora "
                                               "(attention and experts)"),
    (["--moe_layers", "2,2"], "--moe_layers 2,2: layer indices must be distinct and >= 0"),
    (["--moe_layers", "sparse", "--moe_eval_capacity_factor", "2"], "--moe_eval_capacity_factor without "
                                                                    "--moe_capacity_factor: training routes dropless"),
])
def test_moe_option_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ArgumentError) as info:
        parse_arguments(["--model_id", "llava-1.5-7b", *argv])
    assert str(info.value) == message
