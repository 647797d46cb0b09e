"""The MoE block and upcycling on tiny models built from real fixture configs: logits unchanged
at initialisation, the load-balancing loss and where its gradient goes, capacity-limited
routing, and save -> load (plain transformers where the architecture is native)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import require_fixture
from test_train import _shrink_text, tiny_model

from cardtune.registry import get_registry
from cardtune.training.moe import (
    MoEBlock,
    MoEError,
    coefficient_of_variation,
    load_moe_folder,
    moe_blocks,
    plan_moe,
    upcycle,
)
from cardtune.training.moe.balance import layer_balance
from cardtune.training.moe.native import native_target
from cardtune.training.moe.output import save_full_model

ATOL = 1e-5


def card_of(model_id: str) -> Any:
    return get_registry().get(model_id).family


def text_model(fixture: str, layers: int = 4, seed: int = 0) -> Any:
    """A tiny causal LM from the fixture's real config (its architecture), random weights."""
    config = transformers.AutoConfig.from_pretrained(require_fixture(fixture))
    _shrink_text(config, layers=layers)
    config.dtype = torch.float32
    torch.manual_seed(seed)
    return getattr(transformers, config.architectures[0])(config).eval()


def phi_model(layers: int = 4) -> Any:
    """PhiForCausalLM shaped as phi-2 (its fixture config is the old remote-code one, never run):
    its vocabulary, gelu_new, partial rotary 32 of 80 head dims, parallel attention + MLP."""
    phi2 = json.loads((require_fixture("phi-2") / "config.json").read_text())
    config = transformers.PhiConfig(vocab_size=phi2["vocab_size"], hidden_size=32, intermediate_size=128,
                                    num_hidden_layers=layers, num_attention_heads=2,
                                    partial_rotary_factor=phi2["rotary_dim"] / (phi2["n_embd"] / phi2["n_head"]),
                                    hidden_act=phi2["activation_function"], initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.PhiForCausalLM(config).eval()


def token_batch(fixture: str, texts: tuple[str, ...] = ("The cat sat on the mat.", "Hi")) -> dict[str, torch.Tensor]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(require_fixture(fixture), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True))


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def moe(model: Any, model_id: str, layers: str = "sparse", experts: str = "4", top_k: int = 2, **options: Any) -> Any:
    spec = plan_moe(model, card_of(model_id), layers=layers, num_experts=experts, top_k=top_k,
                    router_aux_loss_coef=0.01, **options)
    upcycle(model, spec)
    return spec


def perturb_experts(model: Any, seed: int = 1) -> None:
    """Experts that differ (as after training), so a save -> load test cannot pass by symmetry."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name or ".router." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model("llava-1.5-7b", tmp_path_factory.mktemp("llava") / "model")


def llava_batch(folder: Path) -> dict[str, torch.Tensor]:
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(folder)
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (30, 30, 200))]
    batch = processor(text=["USER: <image>\nWhat colour is it? ASSISTANT: Red.", "USER: <image>\nAnd this? ASSISTANT:"],
                      images=images, return_tensors="pt", padding=True)
    return dict(batch)


# -- initialisation: the dense model's logits -----------------------------------------------------
@pytest.mark.parametrize(("model_id", "fixture"), [("vicuna-7b-v1.5", "vicuna-7b-v1.5"),
                                                   ("qwen2.5-7b-instruct", "qwen2.5-7b-instruct")])
@pytest.mark.parametrize("layers", ["sparse", "dense"])
def test_upcycled_text_model_has_the_dense_logits(model_id: str, fixture: str, layers: str) -> None:
    model = text_model(fixture)
    batch = token_batch(fixture)
    dense = logits(model, batch)
    ffn = model.model.layers[0].mlp
    spec = moe(model, model_id, layers)
    assert spec.layers == ([0, 2] if layers == "sparse" else [0, 1, 2, 3])
    block = model.model.layers[0].mlp
    assert isinstance(block, MoEBlock) and block.experts[0] is ffn and len(block.experts) == 4
    for expert in block.experts[1:]:
        assert all(torch.equal(a, b) for a, b in zip(expert.state_dict().values(), ffn.state_dict().values(),
                                                      strict=True))
    assert (not isinstance(model.model.layers[1].mlp, MoEBlock)) == (layers == "sparse")
    torch.testing.assert_close(logits(model, batch), dense, rtol=0, atol=ATOL)


def test_upcycled_phi_has_the_dense_logits() -> None:
    model = phi_model()
    batch = token_batch("phi-2")
    dense = logits(model, batch)
    spec = moe(model, "phi-2", "second_half", experts="3,2", top_k=2)
    assert spec.layers == [2, 3] and spec.num_experts == [3, 2] and spec.modules == ["model.layers.2.mlp",
                                                                                     "model.layers.3.mlp"]
    assert {n for n, _ in model.model.layers[2].mlp.experts[2].named_parameters()} == {
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    torch.testing.assert_close(logits(model, batch), dense, rtol=0, atol=ATOL)


def test_upcycled_llava_has_the_dense_logits_and_keeps_the_vision_tower(llava_dir: Path) -> None:
    model = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    batch = llava_batch(llava_dir)
    dense = logits(model, batch)
    spec = moe(model, "llava-1.5-7b", "dense", top_k=1)
    assert spec.modules == ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]
    assert not any("vision_tower" in name for name, _ in moe_blocks(model))
    torch.testing.assert_close(logits(model, batch), dense, rtol=0, atol=ATOL)


def test_residual_ffn_keeps_the_dense_logits() -> None:
    model = text_model("vicuna-7b-v1.5")
    batch = token_batch("vicuna-7b-v1.5")
    dense = logits(model, batch)
    moe(model, "vicuna-7b-v1.5", "first_half", use_residual=True)
    block = model.model.layers[1].mlp
    assert block.residual is not None and block.coefficient.out_features == 2
    torch.testing.assert_close(logits(model, batch), dense, rtol=0, atol=ATOL)


def test_layer_choice_and_its_errors() -> None:
    model = text_model("vicuna-7b-v1.5", layers=6)
    card = card_of("vicuna-7b-v1.5")

    def layers(value: str, experts: str = "4", top_k: int = 2) -> list[int]:
        return plan_moe(model, card, layers=value, num_experts=experts, top_k=top_k, router_aux_loss_coef=0).layers

    assert layers("sparse") == [0, 2, 4] and layers("dense") == [0, 1, 2, 3, 4, 5]
    assert layers("first_half") == [0, 1, 2] and layers("second_half") == [3, 4, 5] and layers("5,1") == [1, 5]
    with pytest.raises(MoEError, match=r"^--moe_layers: the model has no decoder layer 6, 9 \(its layers with an MLP "
                                       r"are 0\.\.5\)$"):
        layers("1,6,9")
    with pytest.raises(MoEError, match=r"^--moe_num_experts 4,4: 2 numbers for 3 MoE layers \(0,2,4\)$"):
        layers("sparse", "4,4")
    with pytest.raises(MoEError, match="^--moe_top_k 3: more than the 2 experts of a layer$"):
        layers("sparse", "2", top_k=3)
    text_only = card.model_copy(update={"modules": card.modules.model_copy(update={"llm_mlp": []})})
    with pytest.raises(MoEError, match=r"^family vicuna-v1\.5: its card does not name the language model's MLP "
                                       r"modules \(modules\.llm_mlp\)"):
        plan_moe(model, text_only, layers="sparse", num_experts="4", top_k=2, router_aux_loss_coef=0)
    upcycle(model, plan_moe(model, card, layers="dense", num_experts="2", top_k=1, router_aux_loss_coef=0))
    with pytest.raises(MoEError, match=r"^model\.layers\.0\.mlp is already a mixture of experts$"):
        layers("sparse")


# -- the load-balancing loss ----------------------------------------------------------------------
def _grads(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_aux_loss_reaches_the_router_not_the_experts() -> None:
    """The loss of the last layer's mixture: its router's gradient gains exactly coef x the aux
    gradient, its experts' gradient is the LM loss's alone; the layers below get some through
    the router's input."""
    model = text_model("qwen2.5-7b-instruct")
    batch = token_batch("qwen2.5-7b-instruct")
    moe(model, "qwen2.5-7b-instruct", "3")
    model.train()
    blocks = [block for _, block in moe_blocks(model)]
    for block in blocks:
        block.records = []
    out = model(**batch, labels=batch["input_ids"])
    mask = batch["attention_mask"].reshape(-1)
    aux = torch.stack([layer_balance(block.records[0], mask)[0] for block in blocks]).mean()
    assert 1.0 <= float(aux.detach()) < 4.0  # 1.0 is a perfect balance, 4 experts the worst
    lm, balance, total = _grads(model, out.loss), _grads(model, aux), _grads(model, out.loss + 0.5 * aux)
    routers = [n for n in lm if ".router." in n]
    experts = [n for n in lm if ".experts." in n]
    assert routers and experts
    for name in experts:
        assert balance[name] is None or not balance[name].any(), name
        torch.testing.assert_close(total[name], lm[name], rtol=0, atol=0)
    for name in routers:
        assert balance[name].abs().sum() > 0, name
        torch.testing.assert_close(total[name], lm[name] + 0.5 * balance[name], rtol=1e-5, atol=1e-7)
    assert balance["model.layers.2.self_attn.q_proj.weight"].abs().sum() > 0


def test_balance_loss_counts_real_tokens_only() -> None:
    from cardtune.training.moe import Routing

    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    chosen = torch.tensor([[0], [1], [2], [3]])
    even, counts = layer_balance(Routing(probs, chosen, None), None)
    assert counts.tolist() == [1, 1, 1, 1] and float(even) == pytest.approx(1.0)
    padded, counts = layer_balance(Routing(probs, chosen, None), torch.tensor([1, 1, 0, 0]))
    # two real tokens on experts 0 and 1: f = (.5, .5, 0, 0), P = (.4, .4, .1, .1) -> 4 * .4 = 1.6
    assert counts.tolist() == [1, 1, 0, 0] and float(padded) == pytest.approx(1.6)
    assert coefficient_of_variation(torch.tensor([2.0, 2.0, 2.0, 2.0])) == 0.0
    assert coefficient_of_variation(torch.tensor([4.0, 0.0, 0.0, 0.0])) == pytest.approx(3 ** 0.5)


def test_capacity_drops_assignments_past_it_first_choices_first() -> None:
    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    block = MoEBlock(ffn, 8, num_experts=2, top_k=2, capacity_factor=0.5, min_capacity=1).train()
    with torch.no_grad():
        block.router.weight.copy_(torch.tensor([[1.0] * 8, [0.0] * 8]))  # expert 0 first for x > 0
        for p in block.experts[1].parameters():
            p.mul_(2.0)
    x = torch.rand(1, 6, 8) + 0.1  # 6 tokens, capacity ceil(6 * 2 / 2 * 0.5) = 3 per expert
    block.records = []
    out = block(x)[0]
    kept = block.records[0].kept
    # Slot-major queues: expert 0 keeps tokens 0-2's first choices; expert 1 is every token's
    # second choice and keeps tokens 0-2 too; tokens 3-5 keep nothing and add nothing.
    assert kept.tolist() == [[True, True]] * 3 + [[False, False]] * 3
    probs = block.records[0].probs
    w = probs[:3] / probs[:3].sum(-1, keepdim=True)
    expected = w[:, :1] * block.experts[0](x[0, :3]) + w[:, 1:] * block.experts[1](x[0, :3])
    torch.testing.assert_close(out[:3], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))
    block.eval()  # evaluation routes dropless unless eval_capacity_factor is set
    assert block.capacity(6) == 3 and MoEBlock(ffn, 8, 2, 2).capacity(6) is None


# -- save -> load -------------------------------------------------------------------------------
def test_llama_with_every_layer_upcycled_saves_as_a_mixtral(tmp_path: Path) -> None:
    model = text_model("vicuna-7b-v1.5")
    batch = token_batch("vicuna-7b-v1.5")
    spec = moe(model, "vicuna-7b-v1.5", "dense")
    perturb_experts(model)
    expected = logits(model, batch)
    saved = save_full_model(model, spec, tmp_path, card_class="LlamaForCausalLM")
    assert (saved.format, saved.model_class) == ("Mixtral", "MixtralForCausalLM")
    assert saved.note == "saved as Mixtral: loads with plain transformers (MixtralForCausalLM.from_pretrained)"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and "cardtune_moe" not in config
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(native).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(logits(native, batch), expected, rtol=0, atol=ATOL)


def test_qwen2_with_chosen_layers_saves_as_qwen2_moe(tmp_path: Path) -> None:
    model = text_model("qwen2.5-7b-instruct")
    batch = token_batch("qwen2.5-7b-instruct")
    spec = moe(model, "qwen2.5-7b-instruct", "1,2", experts="3")
    perturb_experts(model)
    expected = logits(model, batch)
    saved = save_full_model(model, spec, tmp_path, card_class="Qwen2ForCausalLM")
    assert (saved.format, saved.model_class) == ("Qwen2-MoE", "Qwen2MoeForCausalLM")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mlp_only_layers"] == [0, 3] and config["norm_topk_prob"] is True
    assert config["shared_expert_intermediate_size"] == 0 and config["num_experts"] == 3
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(native.model.layers[0].mlp).__name__ == "Qwen2MoeMLP"
    assert type(native.model.layers[1].mlp).__name__ == "Qwen2MoeSparseMoeBlock"
    torch.testing.assert_close(logits(native, batch), expected, rtol=0, atol=ATOL)


def test_llava_with_every_layer_upcycled_saves_a_mixtral_text_config(llava_dir: Path, tmp_path: Path) -> None:
    model = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    batch = llava_batch(llava_dir)
    spec = moe(model, "llava-1.5-7b", "dense")
    perturb_experts(model)
    expected = logits(model, batch)
    saved = save_full_model(model, spec, tmp_path, card_class="LlavaForConditionalGeneration")
    assert saved.format == "Mixtral" and saved.model_class is None
    native = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert native.config.text_config.model_type == "mixtral"
    torch.testing.assert_close(logits(native, batch), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", ["sparse llama", "capacity", "residual", "phi", "llava sparse"])
def test_other_mixtures_save_in_cardtune_format_and_load_back(case: str, llava_dir: Path, tmp_path: Path) -> None:
    if case == "phi":
        model, model_id, batch = phi_model(), "phi-2", token_batch("phi-2")
        spec, reason = moe(model, model_id, "dense"), "transformers has no MoE sibling of phi that cardtune maps to"
    elif case == "llava sparse":
        model = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
        model_id, batch = "llava-1.5-7b", llava_batch(llava_dir)
        spec = moe(model, model_id, "sparse")
        reason = "a Mixtral has experts in every layer (--moe_layers dense); this model has them in layers 0"
    else:
        model, model_id, batch = text_model("vicuna-7b-v1.5"), "vicuna-7b-v1.5", token_batch("vicuna-7b-v1.5")
        options = {"capacity": {"capacity_factor": 1.0}, "residual": {"use_residual": True}}.get(case, {})
        spec = moe(model, model_id, "sparse" if case == "sparse llama" else "dense", **options)
        reason = {
            "sparse llama": "a Mixtral has experts in every layer (--moe_layers dense); this model has them in layers 0,2",
            "capacity": "transformers' MoE layers route dropless; this model drops tokens over capacity",
            "residual": "transformers' MoE layers have no residual FFN beside the experts",
        }[case]
    assert native_target(model, spec) == reason
    perturb_experts(model)
    expected = logits(model, batch)
    saved = save_full_model(model, spec, tmp_path, card_class=type(model).__name__)
    assert saved.format == "cardtune MoE" and saved.note.endswith(f"not natively: {reason}")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and config["cardtune_moe"]["layers"] == spec.layers
    loaded = load_moe_folder(card_of(model_id), tmp_path)
    assert [name for name, _ in moe_blocks(loaded)] == spec.modules
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=ATOL)
