"""The demo model: a tiny LLaVA built locally, so ``--model_id tiny-llava-demo`` needs no download.

:func:`ensure_demo_model` writes a plain Hugging Face folder (config, safetensors weights,
tokenizer, ``LlavaProcessor`` with its chat template) that ``from_pretrained`` loads like any
hub checkout. The weights are random from a fixed seed; the tokenizer is a byte-level BPE
trained here on the demo dataset's texts, so every text round-trips exactly.

One 32x32 image is 16 patches of 8x8; the CLIP tower adds a CLS embedding that the
``default`` feature strategy drops again, so one ``<image>`` expands to 16 image tokens.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cardtune.demo.cache import build_once, cache_root, fingerprint
from cardtune.demo.data import corpus

MODEL_NAME = "tiny-llava-demo"
FORMAT = 1  # bump when the build's logic changes (the spec, template and corpus are hashed already)

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IMAGE_TOKEN = "<image>"
TURN_START, END_OF_TURN = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE_TOKEN, TURN_START, END_OF_TURN)

# ChatML. Content is a string or a list of parts ({"type": "image"} renders "<image>\n",
# {"type": "text", "text": ...} its text). Every turn, the assistant's included, ends with
# <|im_end|>, the token a trained model emits to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Everyday English beside the dataset's texts, so a chat prompt outside the dataset still
# splits into words rather than single bytes.
_ENGLISH = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "not word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal point "
    "mother world near build self earth father head stand own page should country found answer school grow "
    "study still learn plant cover food sun four between state keep eye never last let thought city tree "
    "cross farm hard start might story saw far sea draw left late run while press close night real life few "
    "north open seem together next white children begin got walk example ease paper group always music "
    "those both mark often letter until mile river car feet care second book carry took science eat room "
    "friend began idea fish mountain stop once base hear horse cut sure watch colour face wood main enough "
    "plain girl usual young ready above ever red list though feel talk bird soon body dog family direct "
    "pose leave song measure door product black short numeral class wind question happen complete ship area "
    "half rock order fire south problem piece told knew pass since top whole king space heard best hour "
    "better true during hundred five remember step early hold west ground interest reach fast verb sing "
    "listen six table travel less morning ten simple several vowel toward war lay against pattern slow "
    "center love person money serve appear road map rain rule govern pull cold notice voice unit power town "
    "fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct able "
    "pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm "
    "free minute strong special mind behind clear tail produce fact street inch multiply nothing course stay "
    "wheel full force blue object decide surface deep moon island foot system busy test record boat common "
    "gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought "
    "heat snow tire bring yes distant fill east paint language among yellow image please thank hello"
).split()


@dataclass(frozen=True)
class DemoModelSpec:
    """The sizes of the demo model: small enough that 200 steps train in seconds on 2 CPU cores."""

    seed: int = 0
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 128
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    max_positions: int = 512
    # Standard deviation of the lm_head weights. The usual 0.02 caps what a frozen random head
    # can express (the largest logit is about 0.02 * hidden = 2.6, a loss floor near 4.3), so
    # LoRA, which leaves the head frozen, could not fit the demo; 1/sqrt(hidden) lifts the cap.
    lm_head_std: float = 128**-0.5
    vocab_size: int = 1024  # the BPE trainer's target; the corpus may stop merging below it

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SPEC = DemoModelSpec()
IMAGE_TOKENS_PER_IMAGE = SPEC.image_tokens


def tokenizer_corpus() -> list[str]:
    return [*corpus(), " ".join(_ENGLISH), *(w.capitalize() for w in _ENGLISH)]


def model_version(spec: DemoModelSpec = SPEC) -> str:
    """``v<FORMAT>-<hash of the spec, template and corpus>``: the cache folder's suffix."""
    return f"v{FORMAT}-{fingerprint(asdict(spec), CHAT_TEMPLATE, SPECIAL_TOKENS, tokenizer_corpus())}"


def build_tokenizer(spec: DemoModelSpec = SPEC) -> Any:
    """A byte-level BPE (exact round trip for any text) with the demo's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_positions,
    )


def build_processor(tokenizer: Any, spec: DemoModelSpec = SPEC) -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS embedding, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer: Any, spec: DemoModelSpec = SPEC) -> Any:
    """Random weights from ``spec.seed``, without disturbing the caller's random state."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    ids = {
        name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("bos", BOS), ("eos", EOS), ("pad", PAD))
    }
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_intermediate,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            projection_dim=spec.vision_hidden,
        ),
        text_config=LlamaConfig(
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_heads,
            vocab_size=len(tokenizer),
            max_position_embeddings=spec.max_positions,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=spec.image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, spec.lm_head_std)
    # Generation stops at the end of an assistant turn as well as at </s>.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"],
        eos_token_id=[ids["eos"], tokenizer.convert_tokens_to_ids(END_OF_TURN)],
        pad_token_id=ids["pad"],
    )
    return model


def write_demo_model(folder: Path, spec: DemoModelSpec = SPEC) -> None:
    """Write the complete model folder into ``folder`` (which exists and is empty)."""
    from cardtune.quiet import no_weight_bars

    tokenizer = build_tokenizer(spec)
    with no_weight_bars():  # the run's first lines, not a bar for one small file
        build_model(tokenizer, spec).save_pretrained(folder)
    build_processor(tokenizer, spec).save_pretrained(folder)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        # transformers' save_pretrained writes no weights on a rank it takes for a non-main FSDP
        # process (ACCELERATE_USE_FSDP in the environment): such a folder is never kept
        raise RuntimeError(f"building the demo model wrote no config.json or weights into {folder}")


def ensure_demo_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo model folder, built on first use (well under a second) and cached.

    Lives in ``<cache>/tiny-llava-demo-<version>``, ``<cache>`` being ``cache_dir``,
    ``$CARDTUNE_CACHE`` or ``~/.cache/cardtune``.
    """
    target = cache_root(cache_dir) / f"{MODEL_NAME}-{model_version()}"
    with _rank_zero_first():
        return build_once(target, write_demo_model)


def _rank_zero_first() -> Any:
    """In a multi-process launch, rank 0 builds while the others wait; alone, nothing to wait for."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()
