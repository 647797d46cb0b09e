"""The chunked loss (cardtune/training/loss.py) is the model's own training, only without the
whole logits: for a tiny model built from every fixture config that has a card (text and VLM,
Gemma 2's soft-capping, tied embeddings), the loss and every trainable parameter's gradient
equal the model's own path, in full finetuning and under LoRA (lm_head included), with
``num_items_in_batch`` (gradient accumulation) and on packed rows; whole runs through the
Trainer train the same weights with either ``--loss_impl``. A class that does something else to
its logits keeps its own loss, and says so. No chunk's logits outlive its use.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import require_fixture
from test_train import _shrink_text, image_dataset, text_dataset, tiny_model, train
from test_vlm_batches import FAMILIES as IMAGE_FAMILIES
from test_vlm_batches import _samples, _shrink_vision

from cardtune.training.loss import ChunkedLossModel, HeadMismatch, OutputHead, choose_loss, probe_head

IGNORE = -100
CHUNK = 7  # several chunks per batch, the last one short

# fixture folder -> registered model id: every fixture config with a card whose model class transformers
# builds (qwen-vl-chat and phi3-vision ship no modeling code here; deepseek-coder's folder has no config).
TEXT = {
    "gemma-2-2b-it": "gemma-2-2b-it",  # final_logit_softcapping 30
    "gpt-oss-20b": "gpt-oss-20b",
    "llama-2-7b-chat": "llama-2-7b-chat",
    "llama-3-8b-instruct": "llama-3-8b-instruct",
    "mistral-7b-instruct-v0.2": "mistral-7b-instruct-v0.2",
    "mistral-7b-instruct-v0.3": "mistral-7b-instruct-v0.3",
    "phi-2": "phi-2",
    "qwen2.5-7b-instruct": "qwen2.5-7b-instruct",
    "qwen3-4b": "qwen3-4b",  # tied embeddings
    "vicuna-7b-v1.5": "vicuna-7b-v1.5",
}
# VLM classes on text only: llava-interleave (its tokenizer does not load here), qwen2-vl-2b (the instruct
# folder's class and processor are tested with images) and llava-onevision, whose smallest image is 1,458
# tokens: with its 152k vocabulary the model's own path alone would need 2.7 GB (llava-next's anyres
# images go the same way through the same kind of class, with 32k).
VLM_TEXT_ONLY = {"llava-interleave-qwen-7b": "llava-interleave-qwen-7b", "qwen2-vl-2b": "qwen2-vl-2b",
                 "llava-onevision-qwen2-0.5b-ov-hf": "llava-onevision-0.5b-ov"}
IMAGES = {folder: model_id for folder, model_id in IMAGE_FAMILIES.items() if folder not in VLM_TEXT_ONLY}
# Gemma 3's image row alone: its 275 tokens padded into a mixed batch with a 262k vocabulary would
# make the model's own path hold 2.3 GB (test_vlm_batches checks its mixed batches).
IMAGE_ROW_ONLY = {"gemma-3-4b-it"}
ALL = {**TEXT, **IMAGES, **VLM_TEXT_ONLY}
SOFTCAPPED = {"gemma-2-2b-it": 30.0}


# -- tiny models and their batches ---------------------------------------------------------------
def _config(folder: str) -> Any:
    import transformers
    from transformers import AutoConfig

    if folder == "phi-2":  # its folder holds the old remote-code config; the card's class is PhiForCausalLM
        raw = json.loads((require_fixture(folder) / "config.json").read_text())
        config = transformers.PhiConfig(vocab_size=raw["vocab_size"], tie_word_embeddings=raw["tie_word_embeddings"])
    else:
        config = AutoConfig.from_pretrained(require_fixture(folder))
    _shrink_text(config.get_text_config(), layers=2)
    if getattr(config, "vision_config", None) is not None:
        _shrink_vision(config)
    if folder == "gpt-oss-20b":  # 4 experts, not 32: the same head, a quarter of the time
        config.num_local_experts, config.num_experts_per_tok = 4, 2
    return config


def _text_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows, the second padded; prompts (about 60% of each row) masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, min(vocab, 30000), (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :14] = IGNORE
    mask = torch.ones_like(ids)
    mask[1, 19:] = 0
    labels[1, 19:] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def built() -> Any:
    """folder -> (model in train mode, a batch); built once per module. A VLM's batch mixes a row
    with an image and a padded text-only row (test_vlm_batches' samples)."""
    cache: dict[str, tuple[Any, dict[str, Any]]] = {}

    def get(folder: str) -> tuple[Any, dict[str, Any]]:
        if folder not in cache:
            import transformers

            from cardtune.loaders.resolve import resolve_model

            resolved = resolve_model(ALL[folder], require_fixture(folder))
            config = _config(folder)
            torch.manual_seed(0)
            model = getattr(transformers, resolved.card.model_class)(config).float().train()
            if folder in IMAGES:
                from cardtune.collators.engine import ChatEncoder
                from cardtune.loaders.resolve import load_processing

                encoder = ChatEncoder(resolved.card, load_processing(resolved))
                image, text, _ = _samples()  # a row with an image, a text-only row
                rows = [image] if folder in IMAGE_ROW_ONLY else [image, text]
                batch = encoder.handler([encoder.encode(*sample) for sample in rows])
            else:
                batch = _text_batch(config.get_text_config().vocab_size)
            cache[folder] = (model, batch)
        return cache[folder]

    return get


def _with_chunk(head: OutputHead) -> OutputHead:
    return dataclasses.replace(head, chunk_tokens=CHUNK)


def _gradients(model: Any, loss_of: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.detach().clone()
                           for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training(model: Any, batch: dict[str, Any], head: OutputHead, **kwargs: Any) -> set[str]:
    """The loss and every trainable parameter's gradient, the model's own path against the chunked
    one; returns the parameters that got a gradient."""
    own_loss, own = _gradients(model, lambda: model(**batch, **kwargs).loss)
    our_loss, ours = _gradients(model, lambda: ChunkedLossModel(model, head)(**batch, **kwargs)["loss"])
    model.zero_grad(set_to_none=True)  # the module keeps its models, not their gradients
    torch.testing.assert_close(our_loss, own_loss, rtol=1e-5, atol=1e-6)
    assert ours.keys() == own.keys()
    for name, reference in own.items():
        got = ours[name]
        assert (got is None) == (reference is None), name
        if reference is not None:
            scale = reference.abs().max().item()
            error = (got - reference).abs().max().item()
            assert error <= 1e-4 * scale + 1e-7, f"{name}: gradient differs by {error:.3g} (largest {scale:.3g})"
    return {name for name, g in own.items() if g is not None}


# -- every family: the same loss and gradients --------------------------------------------------
@pytest.mark.parametrize("folder", list(ALL))
def test_full_finetuning_loss_and_gradients_equal_the_models_own(built: Any, folder: str) -> None:
    model, batch = built(folder)
    head = probe_head(model)
    expected = SOFTCAPPED.get(folder)
    assert (head.transform.name, head.transform.value) == (("softcap", expected) if expected else ("identity", None))
    if folder in IMAGES:
        assert int((batch["labels"] != IGNORE).sum()) < batch["labels"].numel() // 2  # images and prompts masked
    assert len(assert_same_training(model, batch, _with_chunk(head))) > 10


# The head as LoRA sees it: untied, tied, soft-capped and tied; VLMs untied, tied, with DeepStack.
LORA = ["llama-2-7b-chat", "qwen3-4b", "gemma-2-2b-it", "llava-1.5-7b", "qwen2-vl-2b-instruct", "qwen3-vl-4b-instruct"]


@pytest.mark.parametrize("folder", LORA)
def test_lora_with_lm_head_adapter_gradients_equal_the_models_own(built: Any, folder: str) -> None:
    """LoRA on attention and on lm_head (tied or not): the head's own forward is called, so its
    adapter gets the same gradient as in the model's path (one the batch never reaches, under the
    vision tower's unused last layer, gets none in either)."""
    from peft import LoraConfig, get_peft_model

    base, batch = built(folder)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj", "lm_head"]))
    for name, param in model.named_parameters():  # B = 0 at init would hide a missing gradient through A
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    graded = assert_same_training(model, batch, _with_chunk(probe_head(model)))
    assert {n for n, p in model.named_parameters() if "lm_head.lora_" in n and p.requires_grad} <= graded


def test_a_trained_copy_of_lm_head_gets_the_same_gradient(built: Any) -> None:
    """peft's modules_to_save copy of lm_head (a fully trained head next to LoRA)."""
    from peft import LoraConfig, get_peft_model

    base, batch = built("llama-2-7b-chat")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0,
                                                           modules_to_save=["lm_head"]))
    head = probe_head(model)
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    assert len(assert_same_training(model, batch, _with_chunk(head))) > 2


# -- normalisation: gradient accumulation, packing ---------------------------------------------
@pytest.mark.parametrize("folder", ["llama-2-7b-chat", "gemma-2-2b-it", "qwen2.5-vl-3b-instruct"])
def test_num_items_in_batch_divides_as_the_model_does(built: Any, folder: str) -> None:
    """Under gradient accumulation the Trainer passes the accumulated batches' trained-token
    count (to a model that takes loss kwargs; Qwen2.5-VL's class says it does not, and the
    Trainer's whole-run test below covers that): the sum is divided by it, as the model does."""
    model, batch = built(folder)
    head = _with_chunk(probe_head(model))
    assert head.uses_num_items
    assert_same_training(model, batch, head, num_items_in_batch=torch.tensor(37))


@pytest.mark.parametrize("layout", ["padding_free", "block_mask"])
def test_packed_rows_give_the_models_own_loss(built: Any, layout: str) -> None:
    from cardtune.data.batching import PackedRow, collate_packed

    model, _ = built("qwen3-4b")
    g = torch.Generator().manual_seed(1)
    rows = []
    for lengths in ([9, 6, 11], [13, 5]):
        ids, labels, positions = [], [], []
        for n in lengths:
            sample = torch.randint(10, 30000, (n,), generator=g).tolist()
            ids += sample
            labels += [IGNORE] * (n // 2) + sample[n // 2:]
            positions += list(range(n))
        rows.append(PackedRow(ids, labels, positions, lengths, [f"s{i}" for i in range(len(lengths))]))
    batch = collate_packed(rows, pad_id=0, attention=layout)
    assert_same_training(model, batch, _with_chunk(probe_head(model)), num_items_in_batch=torch.tensor(29))


# -- the head's transform is shown, not read from the config ----------------------------------
def test_softcapping_where_the_class_applies_it_and_not_where_it_does_not(built: Any) -> None:
    """Gemma3ForCausalLM applies final_logit_softcapping; Gemma3ForConditionalGeneration (here,
    in transformers 5.25) does not, whatever its text config says: the probe follows the class."""
    import transformers

    config = _config("gemma-3-4b-it")
    config.text_config.final_logit_softcapping = 20.0
    batch = _text_batch(config.text_config.vocab_size)
    for cls, expected in ((transformers.Gemma3ForCausalLM, "softcap"),
                          (transformers.Gemma3ForConditionalGeneration, "identity")):
        torch.manual_seed(0)
        model = cls(config.text_config if cls is transformers.Gemma3ForCausalLM else config).train()
        head = probe_head(model)
        assert head.transform.name == expected, cls.__name__
        assert_same_training(model, batch, _with_chunk(head))


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_families_that_scale_their_logits(family: str) -> None:
    """Cohere multiplies its logits by logit_scale, Granite divides them by logits_scaling (no card
    here yet: shown so that such a card trains with the chunked loss too)."""
    import transformers

    small = dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    if family == "cohere":
        config, cls, expected = transformers.CohereConfig(**small, logit_scale=0.25), transformers.CohereForCausalLM, "multiply"
    else:
        config, cls, expected = transformers.GraniteConfig(**small, logits_scaling=8.0), transformers.GraniteForCausalLM, "divide"
    torch.manual_seed(0)
    model = cls(config).train()
    head = probe_head(model)
    assert head.transform.name == expected
    assert_same_training(model, _text_batch(500), _with_chunk(head), num_items_in_batch=torch.tensor(11))


def test_router_aux_loss_is_added_as_the_model_adds_it(built: Any) -> None:
    """gpt-oss with output_router_logits: its loss adds router_aux_loss_coef * aux_loss."""
    import transformers

    config = _config("gpt-oss-20b")
    config.output_router_logits = True
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).train()
    head = probe_head(model)
    assert head.aux_loss_coef == config.router_aux_loss_coef
    assert len(assert_same_training(model, _text_batch(config.vocab_size), _with_chunk(head))) > 10


# -- what falls back, and says so ---------------------------------------------------------------
def _llama_config() -> Any:
    import transformers

    return transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1)


def test_a_class_that_changes_its_logits_otherwise_keeps_its_own_loss() -> None:
    import transformers

    class ShiftedLogits(transformers.LlamaForCausalLM):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + 1.0
            return out

    head, note = choose_loss(ShiftedLogits(_llama_config()), "chunked")
    assert head is None
    assert note == ("loss: the model's own (its forward changes the logits after the output embedding in a way "
                    "cardtune does not reproduce; the chunked loss is not used)")


def test_a_forward_without_logits_to_keep_keeps_its_own_loss() -> None:
    import transformers

    class NoLogitsToKeep(transformers.LlamaForCausalLM):
        def forward(self, input_ids: Any = None, labels: Any = None, attention_mask: Any = None) -> Any:
            return super().forward(input_ids=input_ids, labels=labels, attention_mask=attention_mask)

    head, note = choose_loss(NoLogitsToKeep(_llama_config()), "chunked")
    assert head is None and "its forward refused the probe (TypeError" in note


def test_a_loss_that_is_not_the_causal_lm_cross_entropy_keeps_its_own() -> None:
    import transformers

    class Smoothed(transformers.LlamaForCausalLM):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            if out.loss is not None:
                out.loss = out.loss * 0.9
            return out

    with pytest.raises(HeadMismatch, match="its loss is not the causal-LM cross-entropy"):
        probe_head(Smoothed(_llama_config()))


def test_turned_off_or_not_applicable_says_why() -> None:
    import transformers

    model = transformers.LlamaForCausalLM(_llama_config())
    assert choose_loss(model, "model") == (None, "loss: the model's own (--loss_impl model)")
    head, note = choose_loss(model, "chunked", label_smoothing=0.1)
    assert head is None and "label smoothing" in note
    head, note = choose_loss(model, "chunked")
    assert isinstance(head, OutputHead) and note.startswith("loss: chunked cross-entropy") and "--loss_impl model" in note


# -- memory: no chunk's logits are kept ---------------------------------------------------------
def test_no_tensor_of_tokens_by_vocabulary_is_made_or_kept(built: Any) -> None:
    """The head sees at most one chunk of rows; autograd keeps nothing vocabulary-wide but the
    head's own weights (the model's own path keeps the log-softmax of every position)."""
    model, batch = built("gemma-2-2b-it")
    head = _with_chunk(probe_head(model))
    vocab = head.vocab_size
    rows: list[int] = []
    handle = head.module.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[torch.Size] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(t.shape)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = ChunkedLossModel(model, head)(**batch)["loss"]
        loss.backward()
    finally:
        handle.remove()
    trained = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert max(rows) <= CHUNK and sum(rows[1:]) == 2 * trained  # (the model's empty call) forward, backward
    assert rows[0] == 0
    assert not [s for s in saved if s.numel() and len(s) and s[-1] == vocab]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(**batch).loss.backward()
    assert any(len(s) and s[-1] == vocab and s.numel() >= batch["input_ids"].numel() * vocab for s in saved)


def test_dropout_in_the_head_is_replayed_in_backward(built: Any) -> None:
    """LoRA dropout on lm_head: backward makes each chunk's logits with the forward's random
    numbers, so the gradient is that of the loss it returned (checked against plain autograd
    over the same chunks from the same seed)."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    base, batch = built("llama-2-7b-chat")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_dropout=0.5, target_modules=["lm_head"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    head = _with_chunk(probe_head(model))
    assert head.stochastic
    torch.manual_seed(3)
    ours_loss, ours = _gradients(model, lambda: ChunkedLossModel(model, head)(**batch)["loss"])

    def plain() -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long), output_hidden_states=True).hidden_states[-1]
        shift = F.pad(batch["labels"], (0, 1), value=IGNORE)[..., 1:]
        h, t = hidden[shift != IGNORE], shift[shift != IGNORE]
        total = sum(F.cross_entropy(head.logits(h[s:s + CHUNK]), t[s:s + CHUNK], reduction="sum")
                    for s in range(0, len(t), CHUNK))
        return total / len(t)

    torch.manual_seed(3)
    plain_loss, reference = _gradients(model, plain)
    torch.testing.assert_close(ours_loss, plain_loss)
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# -- whole runs: the Trainer, gradient accumulation, packing -------------------------------------
def _run(argv: list[str], out: Path, impl: str) -> Any:
    return train([*argv, "--output_dir", str(out / impl), "--loss_impl", impl, "--seed", "7",
                  "--gradient_accumulation_steps", "2", "--max_steps", "2", "--warmup_steps", "0",
                  "--learning_rate", "1e-2", "--data_cache", "none"])


@pytest.mark.parametrize("fixture", ["llama-2-7b-chat", "qwen2.5-vl-3b-instruct"])
def test_runs_train_the_same_weights_with_either_loss(fixture: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Two optimizer steps of two accumulated packed batches each, through the Trainer: Llama 2
    (full finetuning, num_items_in_batch passed) and Qwen2.5-VL (images, LoRA, a class the
    Trainer passes no num_items_in_batch): the same losses logged and the same weights trained."""
    model_dir = tiny_model(fixture, tmp_path / "model")
    argv = ["--model_id", fixture, "--model_path", str(model_dir), "--per_device_train_batch_size", "2",
            "--packing", "--max_length", "96"]  # two or three samples a row, several rows a batch
    if fixture == "llama-2-7b-chat":
        argv += ["--data_path", str(text_dataset(tmp_path, n=16))]
    else:
        data, images = image_dataset(tmp_path, n=10)
        argv += ["--data_path", str(data), "--image_folder", str(images), "--use_lora", "--lora_dropout", "0"]
    chunked = _run(argv, tmp_path, "chunked")
    assert "note: loss: chunked cross-entropy" in capsys.readouterr().out
    own = _run(argv, tmp_path, "model")
    assert "note: loss: the model's own (--loss_impl model)" in capsys.readouterr().out
    assert chunked.trainer.model_accepts_loss_kwargs == (fixture == "llama-2-7b-chat")
    assert len(chunked.trainer.train_dataset) >= 4
    history = [[h["loss"] for h in r.trainer.state.log_history if "loss" in h] for r in (chunked, own)]
    assert len(history[0]) == 2
    assert history[0] == pytest.approx(history[1], rel=1e-5)
    trained = dict(own.trainer.model.named_parameters())
    for name, param in chunked.trainer.model.named_parameters():
        torch.testing.assert_close(param, trained[name], rtol=1e-4, atol=1e-6, msg=name)

