"""Real chat templates of 2025-26 families the engine has never seen, labelled by reading them.

Each file under ``tests/templates/`` is a family's published chat template; its header comment
names the repository, path and commit it was taken from (the header is stripped before use, so
the template is byte for byte as published). No family is named anywhere in cardtune: the engine
must find the header, the ends of turn and the reasoning layout from the template itself.

A template is installed (a card with ``chat.template: jinja``) on the real qwen2.5 tokenizer, with
the control tokens the template writes added as special tokens and bos/eos set as the family's
tokenizer config has them. The expected spans are what the template writes for each answer, read
off the template: the answer as rendered (trimmed where the template trims), its reasoning where
the template renders it, and the token(s) that end it; never the header, never user or system
text. Where the template writes no end after the last answer, the engine appends one; every other
token of the ids must be the template's own render of the conversation.

A reasoning answer is trained from the end of the generation prompt on (what the model writes
itself): where the prompt already opens ``<think>\n`` (MiniMax-M2, Qwen3.5), that is not trained.

``FIXED`` holds the cases the engine got wrong when the zoo was collected; each reason names the
property of the template the engine had assumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require_fixture

IGNORE = -100
TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Family:
    special: tuple[str, ...]
    """Control tokens the template writes (added as special tokens)."""
    plain: tuple[str, ...] = ()
    """Added tokens that are not special (think tags, as Qwen3's tokenizer has them)."""
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    adds_bos: bool = False
    """The family's tokenizer adds bos itself (and the template writes it too)."""
    allow_shared: bool = False
    """bos = eos in the family's tokenizer (Granite): the card says so."""
    appended: str = ""
    """What follows the last answer in the ids where the template writes nothing after it."""
    drops_system: bool = False
    """The template writes a fixed system prompt and drops the user's (it is folded)."""


FAMILIES: dict[str, Family] = {
    "apertus": Family(
        ("<s>", "</s>", "<|system_start|>", "<|system_end|>", "<|developer_start|>", "<|developer_end|>",
         "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>", "<|inner_prefix|>",
         "<|inner_suffix|>", "<|tools_prefix|>", "<|tools_suffix|>"),
        bos="<s>", eos="<|assistant_end|>", adds_bos=True, appended="<|assistant_end|>"),
    "command-r7b": Family(
        ("<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
         "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>",
         "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"),
        bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", adds_bos=True),
    "deepseek-r1-distill": Family(
        ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"), ("<think>", "</think>"),
        bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", adds_bos=True),
    "deepseek-v3.1": Family(
        ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"), ("<think>", "</think>"),
        bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", adds_bos=True),
    "exaone-4.0": Family(
        ("[BOS]", "[|system|]", "[|user|]", "[|assistant|]", "[|tool|]", "[|endofturn|]"), ("<think>", "</think>"),
        bos="[BOS]", eos="[|endofturn|]"),
    "gemma-4": Family(
        ("<bos>", "<eos>", "<|turn>", "<turn|>", "<|image|>", "<|audio|>", "<|video|>", "<|channel>", "<channel|>",
         "<|think|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'),
        bos="<bos>", eos="<eos>", adds_bos=True),
    "gigachat3": Family(("<s>", "</s>", "<|role_sep|>", "<|message_sep|>"), bos="<s>", eos="</s>", adds_bos=True),
    "glm-4.6": Family(
        ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"),
        ("<think>", "</think>"), eos="<|endoftext|>", appended="<|user|>"),
    "granite-3.3": Family(
        ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
        bos="<|end_of_text|>", eos="<|end_of_text|>", pad="<|end_of_text|>", allow_shared=True),
    "hy3-preview": Family(
        ("<｜hy_begin▁of▁sentence｜>", "<｜hy_User｜>", "<｜hy_Assistant｜>", "<｜hy_eos｜>", "<｜hy_▁pad▁｜>", "<｜reasoning_mode｜>"),
        ("<think>", "</think>"), bos="<｜hy_begin▁of▁sentence｜>", eos="<｜hy_eos｜>", pad="<｜hy_▁pad▁｜>",
        appended="<｜hy_eos｜>"),
    "kimi-k2": Family(
        ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>", "<|media_start|>",
         "<|media_content|>", "<|media_pad|>", "<|media_end|>", "[BOS]", "[EOS]"),
        bos="[BOS]", eos="[EOS]"),
    "lfm2.5": Family(
        ("<|startoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|tool_call_start|>", "<|tool_call_end|>"),
        ("<think>", "</think>"), bos="<|startoftext|>", eos="<|im_end|>", adds_bos=True),
    "minimax-m2": Family(("]~!b[", "]~b]", "[e~["), ("<think>", "</think>"), bos="]~!b[", eos="[e~["),
    "mistral-small-3.2": Family(
        ("<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[TOOL_CALLS]",
         "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"),
        bos="<s>", eos="</s>", adds_bos=True),
    "nemotron-nano-v2": Family(("<s>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>"), ("<think>", "</think>"),
                               bos="<s>", eos="<SPECIAL_12>"),
    "phi-4-reasoning-vision": Family(("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"), eos="<|im_end|>",
                                     drops_system=True),
    "qwen3.5": Family((), ("<think>", "</think>"), eos="<|im_end|>"),
    "seed-oss": Family(
        ("<seed:bos>", "<seed:eos>", "<seed:pad>", "<seed:think>", "</seed:think>", "<seed:cot_budget_reflect>",
         "</seed:cot_budget_reflect>", "<seed:tool_call>", "</seed:tool_call>"),
        bos="<seed:bos>", eos="<seed:eos>", pad="<seed:pad>"),
    "smollm3": Family(("<|im_start|>", "<|im_end|>"), ("<think>", "</think>"), eos="<|im_end|>"),
    # -- added in the second collection --
    "apriel-1.5": Family(
        ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|content|>", "<|tool_result|>", "[IMG]"),
        bos="<s>", eos="</s>"),
    "functiongemma": Family(
        ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_function_declaration>", "<end_function_declaration>",
         "<start_function_call>", "<end_function_call>", "<start_function_response>", "<end_function_response>", "<escape>"),
        bos="<bos>", eos="<eos>", adds_bos=True, drops_system=True),
    "llama-4": Family(
        ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|image|>", "<|python_start|>",
         "<|python_end|>"),
        bos="<|begin_of_text|>", eos="<|eot|>", adds_bos=True),
    "magistral-small-2509": Family(
        ("<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[THINK]", "[/THINK]", "[IMG]",
         "[TOOL_CALLS]", "[ARGS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"),
        bos="<s>", eos="</s>", adds_bos=True),
    "mistral-nemo": Family(
        ("<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
         "[/TOOL_RESULTS]"),
        bos="<s>", eos="</s>", adds_bos=True, drops_system=True),
    "phi-3.5-mini": Family(("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
                           bos="<s>", eos="<|endoftext|>"),
    "qwq-32b": Family((), ("<think>", "</think>"), eos="<|im_end|>"),
    # -- added in the third collection --
    # functionary ships Llama-3.1's tokenizer (bos added by it as well); eos <|eot_id|> is a guess from Llama-3.1-Instruct
    # Apriel-1.5's tokenizer (bos <s>, eos </s>; 1.6 is taken to keep it): the template writes neither eos nor any end
    # after the last answer
    "apriel-1.6": Family(("<s>", "</s>", "<|begin_system|>", "<|begin_user|>", "<|begin_assistant|>", "<|end|>",
                          "<|begin_tool_result|>", "<|begin_content|>", "[IMG]"), bos="<s>", eos="</s>", appended="\n<|end|>"),
    "functionary-v3.2": Family(("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                               bos="<|begin_of_text|>", eos="<|eot_id|>", adds_bos=True),
    "llama-3.3": Family(
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", adds_bos=True),
    # a Llama-3.3 tokenizer (bos added by it; eos <|eot_id|> as Llama-3.3-Instruct has it); the template writes
    # <|begin_of_text|> as a literal, not bos_token
    "nemotron-super-v1.5": Family(("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                                  ("<think>", "</think>"), bos="<|begin_of_text|>", eos="<|eot_id|>", adds_bos=True),
    # public K3 ports stop generation on <|end_of_msg|> (taken as eos); the template writes no bos
    # as Kimi-K2 (the zoo's kimi-k2 entry): bos [BOS], eos [EOS], neither written by the template
    "kimi-k2-thinking": Family(
        ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>", "<|media_start|>",
         "<|media_content|>", "<|media_pad|>", "<|media_end|>", "[BOS]", "[EOS]"), ("<think>", "</think>"),
        bos="[BOS]", eos="[EOS]"),
    "kimi-k3": Family(("<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>", "<|kimi_image_placeholder|>", "[BOS]", "[EOS]"),
                      bos="[BOS]", eos="<|end_of_msg|>"),
    # eos <|im_end|> is a guess (the turns' end); the template writes no bos
    "nemotron-3-nano": Family((), ("<think>", "</think>"), eos="<|im_end|>"),
    # StepFun's bos is not known here (a guess: none; the template writes bos_token, which renders empty)
    "stepfun-3.7-flash": Family(("<im_patch>",), ("<think>", "</think>"), eos="<|im_end|>"),
}


def template_text(name: str) -> str:
    """The template as published: the file without its provenance header."""
    raw = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    assert raw.startswith("{#- cardtune template zoo") and "    source: " in raw.split("-#}\n", 1)[0], name
    return raw.split("-#}\n", 1)[1]


def build_encoder(name: str, root: Path) -> Any:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model
    from cardtune.registry.schema import ChatSpec, SpecialTokens

    family = FAMILIES[name]
    tok = AutoTokenizer.from_pretrained(require_fixture("qwen2.5-7b-instruct"))
    if family.special:
        tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                               for t in family.special]})
    if family.plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain])
    for role in ("bos", "eos", "pad"):
        if getattr(family, role):
            setattr(tok, f"{role}_token", getattr(family, role))
    tok.add_bos_token = family.adds_bos
    folder = root / name
    tok.save_pretrained(folder)
    resolved = resolve_model("qwen2.5-7b-instruct", folder)
    chat = ChatSpec(template="jinja", jinja=template_text(name),
                    special_tokens=SpecialTokens(allow_shared=family.allow_shared))
    card = resolved.card.model_copy(update={"chat": chat})
    encoder = ChatEncoder(card, load_processing(dataclasses.replace(resolved, card=card)))
    assert (encoder.tokenizer("a").input_ids[0] == encoder.tokenizer.bos_token_id) == family.adds_bos
    return encoder


@pytest.fixture(scope="module")
def encoder_for(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("zoo")
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = build_encoder(name, root)
        return cache[name]

    return get


# -- conversations ---------------------------------------------------------------------------

TYPED_ROLES: dict[str, tuple[str, str]] = {
    "apertus": ("Write <|assistant_start|>x<|assistant_end|>.", "<|user_start|>typed"),
    "command-r7b": ("<|START_RESPONSE|>quoted<|END_RESPONSE|>", "Turn ends <|END_OF_TURN_TOKEN|>."),
    "deepseek-r1-distill": ("Type <｜Assistant｜> here.", "And <｜end▁of▁sentence｜> there."),
    "deepseek-v3.1": ("Type <｜Assistant｜> here.", "And <｜end▁of▁sentence｜> there."),
    "exaone-4.0": ("[|assistant|]\nquoted[|endofturn|]", "Plain [|user|] text."),
    "gemma-4": ("A turn is <|turn>model\nhi<turn|>", "Typed <turn|> end."),
    "gigachat3": ("Write assistant<|role_sep|>\nhi<|message_sep|>", "<|message_sep|> typed."),
    "glm-4.6": ("Write <|assistant|> then stop.", "<|user|> is typed here."),
    "granite-3.3": ("Roles look like <|start_of_role|>assistant<|end_of_role|>.", "End: <|end_of_text|>"),
    "hy3-preview": ("Write <｜hy_Assistant｜><think></think>x.", "<｜hy_eos｜> typed."),
    "kimi-k2": ("I write <|im_assistant|>assistant<|im_middle|> and <|im_end|>.", "Then <|im_user|>."),
    "lfm2.5": ("ChatML: <|im_start|>assistant\nHi<|im_end|>", "Done<|im_end|>"),
    "minimax-m2": ("Roles: ]~b]ai\nHi[e~[", "Typed [e~[ here."),
    "mistral-small-3.2": ("Use [INST] and [/INST] like this.", "It ends with </s> usually."),
    "nemotron-nano-v2": ("<SPECIAL_11>Assistant\nQuoted.", "Ends\n<SPECIAL_12>\nhere."),
    "phi-4-reasoning-vision": ("A turn: <|im_end|>\n<|im_start|>assistant<|im_sep|>\nok", "<|im_start|>user<|im_sep|>x"),
    "qwen3.5": ("ChatML: <|im_start|>assistant\nHi<|im_end|>", "Done<|im_end|>"),
    "seed-oss": ("Write <seed:bos>assistant\nnext.", "<seed:eos> early."),
    "smollm3": ("ChatML: <|im_start|>assistant\nHi<|im_end|>", "Done<|im_end|>"),
    "apriel-1.5": ("Write <|assistant|>\nx\n<|end|>", "<|user|>\ntyped"),
    "functiongemma": ("A turn is <start_of_turn>model\nhi<end_of_turn>", "Typed <end_of_turn> end."),
    "llama-4": ("Type <|header_start|>assistant<|header_end|> here.", "And <|eot|> there."),
    "magistral-small-2509": ("Use [THINK] and [/THINK] like this.", "It ends with </s> usually."),
    "mistral-nemo": ("Use [INST] and [/INST] like this.", "It ends with </s> usually."),
    "phi-3.5-mini": ("Write <|assistant|>\nx<|end|>", "<|user|>\ntyped"),
    "qwq-32b": ("ChatML: <|im_start|>assistant\nHi<|im_end|>", "Done<|im_end|>"),
    "apriel-1.6": ("Write <|begin_assistant|>\nx\n<|end|>", "<|begin_user|>\ntyped"),
    "functionary-v3.2": ("Write >>>all\nx<|eot_id|>", "<|start_header_id|>user<|end_header_id|> typed"),
    "llama-3.3": ("Type <|start_header_id|>assistant<|end_header_id|> here.", "And <|eot_id|> there."),
    "kimi-k2-thinking": ("I write <|im_assistant|>assistant<|im_middle|> and <|im_end|>.", "Then <|im_user|>."),
    "kimi-k3": ("Tags: <|open|>response<|sep|>hi<|close|>response<|sep|>", "Typed <|end_of_msg|> end."),
    "nemotron-3-nano": ("ChatML: <|im_start|>assistant\nHi<|im_end|>", "Done<|im_end|>"),
    "nemotron-super-v1.5": ("Type <|start_header_id|>assistant<|end_header_id|> here.", "And <|eot_id|> there."),
    "stepfun-3.7-flash": ("ChatML: <|im_start|>assistant\nHi<|im_end|>", "Done<|im_end|>"),
}


@dataclass(frozen=True)
class Conversation:
    turns: tuple[tuple[str, str], ...]
    system: str | None = None
    reasoning: tuple[tuple[int, str], ...] = ()


def conversation(name: str, case: str) -> Conversation:
    if case == "roles":  # answers typing the template's own role strings and ends of turn
        first, second = TYPED_ROLES[name]
        return Conversation((("Quote the format.", first), ("Again?", second)))
    return CASES[case]


CASES: dict[str, Conversation] = {
    "single": Conversation((("What is 2+2?", "4."),)),
    "system3": Conversation((("One?", "1."), ("Two?", "2."), ("Three?", "3.")), system="Be brief."),
    "whitespace": Conversation((("Indent?", "  Indented.\n"), ("Newline?", "\nStarts on a new line."),
                                ("Tabs?", "Ends with a tab.\t"))),
    "reasoning_last": Conversation((("One?", "1."), ("Two?", "2.")), reasoning=((1, "Two is one more."),)),
    "reasoning_both": Conversation((("One?", "1."), ("Two?", "2.")),
                                   reasoning=((0, "Earlier thought."), (1, "Two is one more."))),
    # the documented switch of hybrid reasoning models to their non-reasoning mode
    "no_think": Conversation((("One?", "1."), ("Two?", "2.")), system="Be brief. /no_think"),
    # an answer that writes the template's reasoning separator
    "think_in_answer": Conversation((("Tag?", "Close with </think> then."),)),
}


def messages(conv: Conversation, parts: bool) -> list[dict[str, Any]]:
    """``parts``: content as lists of text parts (as data gives it); else strings (the reference)."""
    def content(text: str) -> Any:
        return [{"type": "text", "text": text}] if parts else text

    out: list[dict[str, Any]] = [{"role": "system", "content": content(conv.system)}] if conv.system else []
    thoughts = dict(conv.reasoning)
    for k, (question, answer) in enumerate(conv.turns):
        out.append({"role": "user", "content": content(question)})
        out.append({"role": "assistant", "content": content(answer)})
        if k in thoughts:
            out[-1]["reasoning_content"] = thoughts[k]
    return out


def make_sample(name: str, case: str) -> Any:
    from cardtune.conversation import Sample

    return Sample(f"{name}/{case}", messages(conversation(name, case), parts=True))


def trained(encoder: Any, encoded: Any) -> list[str]:
    runs: list[list[int]] = []
    run: list[int] = []
    for i, lab in zip(encoded.input_ids, encoded.labels, strict=True):
        if lab != IGNORE:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    return [encoder.tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in runs]


def own_render(encoder: Any, name: str, conv: Conversation) -> str:
    """The template's own render of the conversation (transformers, the card's render date), and
    the end the engine appends where the template writes none after the last answer."""
    from cardtune.collators.roles import frozen_template
    from cardtune.registry.schema import ChatSpec

    template = frozen_template(template_text(name), ChatSpec().render_date)
    text = encoder.tokenizer.apply_chat_template(messages(conv, parts=False), tokenize=False, chat_template=template)
    return text + FAMILIES[name].appended


# -- expectations, read off each template ------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """A fair refusal: the sample is reported (``SampleError`` with this reason), never trained."""

    reason: str
    why: str


NO_REASONING = Refused("template_error", "the template renders no reasoning field")
REASONING = ("reasoning_last", "reasoning_both")

EXPECTED: dict[str, dict[str, list[str] | Refused]] = {
    "apertus": {
        # <|assistant_end|> is written only when a user turn follows: the last answer gets eos
        "single": ["4.<|assistant_end|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "command-r7b": {**dict.fromkeys(REASONING, NO_REASONING)},
    "deepseek-r1-distill": {
        "single": ["4.<｜end▁of▁sentence｜>"],
        "system3": ["1.<｜end▁of▁sentence｜>", "2.<｜end▁of▁sentence｜>", "3.<｜end▁of▁sentence｜>"],
        "whitespace": ["  Indented.\n<｜end▁of▁sentence｜>", "\nStarts on a new line.<｜end▁of▁sentence｜>",
                       "Ends with a tab.\t<｜end▁of▁sentence｜>"],
        "roles": ["Type <｜Assistant｜> here.<｜end▁of▁sentence｜>", "And <｜end▁of▁sentence｜> there.<｜end▁of▁sentence｜>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "deepseek-v3.1": {  # header <｜Assistant｜></think> (non-thinking mode), answer, <｜end▁of▁sentence｜>
        "single": ["4.<｜end▁of▁sentence｜>"],
        "system3": ["1.<｜end▁of▁sentence｜>", "2.<｜end▁of▁sentence｜>", "3.<｜end▁of▁sentence｜>"],
        "whitespace": ["  Indented.\n<｜end▁of▁sentence｜>", "\nStarts on a new line.<｜end▁of▁sentence｜>",
                       "Ends with a tab.\t<｜end▁of▁sentence｜>"],
        "roles": ["Type <｜Assistant｜> here.<｜end▁of▁sentence｜>", "And <｜end▁of▁sentence｜> there.<｜end▁of▁sentence｜>"],
        **dict.fromkeys(REASONING, NO_REASONING),
        # content.split('</think>', 1)[1]: the template drops what an answer writes before </think>
        "think_in_answer": Refused("label_contract", "the template rewrites the answer"),
    },
    "exaone-4.0": {  # the empty <think>\n\n</think>\n\n opens every answer: part of the header
        "single": ["4.[|endofturn|]"],
        "system3": ["1.[|endofturn|]", "2.[|endofturn|]", "3.[|endofturn|]"],
        # the header's last \n\n and the answer's \n tokenize as one \n\n\n: trained (docs/MASKING.md)
        "whitespace": ["  Indented.\n[|endofturn|]", "\n\n\nStarts on a new line.[|endofturn|]", "Ends with a tab.\t[|endofturn|]"],
        "roles": ["[|assistant|]\nquoted[|endofturn|][|endofturn|]", "Plain [|user|] text.[|endofturn|]"],
        # reasoning is rendered only with skip_think=False, which a training render does not pass
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "gemma-4": {  # <|turn>model\n ... <turn|>; model text trimmed (strip_thinking)
        "single": ["4.<turn|>"],
        "system3": ["1.<turn|>", "2.<turn|>", "3.<turn|>"],
        "whitespace": ["Indented.<turn|>", "Starts on a new line.<turn|>", "Ends with a tab.<turn|>"],
        "roles": ["A turn is <|turn>model\nhi<turn|><turn|>", "Typed <turn|> end.<turn|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "gigachat3": {**dict.fromkeys(REASONING, NO_REASONING)},
    "glm-4.6": {},
    "granite-3.3": {  # bos = eos = <|end_of_text|>, which also ends every turn
        "single": ["4.<|end_of_text|>"],
        "system3": ["1.<|end_of_text|>", "2.<|end_of_text|>", "3.<|end_of_text|>"],
        "whitespace": ["  Indented.\n<|end_of_text|>", "\nStarts on a new line.<|end_of_text|>", "Ends with a tab.\t<|end_of_text|>"],
        "roles": ["Roles look like <|start_of_role|>assistant<|end_of_role|>.<|end_of_text|>", "End: <|end_of_text|><|end_of_text|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "hy3-preview": {
        "single": ["4.<｜hy_eos｜>"],
        # reasoning is rendered only with is_training or interleaved_thinking (tools)
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "kimi-k2": {
        "single": ["4.<|im_end|>"],
        "system3": ["1.<|im_end|>", "2.<|im_end|>", "3.<|im_end|>"],
        "whitespace": ["  Indented.\n<|im_end|>", "\nStarts on a new line.<|im_end|>", "Ends with a tab.\t<|im_end|>"],
        "roles": ["I write <|im_assistant|>assistant<|im_middle|> and <|im_end|>.<|im_end|>", "Then <|im_user|>.<|im_end|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "lfm2.5": {  # thinking rendered after the last user message only, <think>R</think> then the answer
        "single": ["4.<|im_end|>"],
        "system3": ["1.<|im_end|>", "2.<|im_end|>", "3.<|im_end|>"],
        "whitespace": ["  Indented.\n<|im_end|>", "\n\nStarts on a new line.<|im_end|>", "Ends with a tab.\t<|im_end|>"],
        "reasoning_last": ["1.<|im_end|>", "<think>Two is one more.</think>2.<|im_end|>"],
        "reasoning_both": ["1.<|im_end|>", "<think>Two is one more.</think>2.<|im_end|>"],
        "roles": ["ChatML: <|im_start|>assistant\nHi<|im_end|><|im_end|>", "Done<|im_end|><|im_end|>"],
    },
    "minimax-m2": {  # ]~b]ai\n ... [e~[; reasoning after the last user message only
        "single": ["4.[e~["],
        "system3": ["1.[e~[", "2.[e~[", "3.[e~["],
        "whitespace": ["  Indented.\n[e~[", "\n\nStarts on a new line.[e~[", "Ends with a tab.\t[e~["],
        # the generation prompt opens <think>\n: the model never writes it, so it is not trained
        "reasoning_last": ["1.[e~[", "Two is one more.\n</think>\n\n2.[e~["],
        "reasoning_both": ["1.[e~[", "Two is one more.\n</think>\n\n2.[e~["],
        "roles": ["Roles: ]~b]ai\nHi[e~[[e~[", "Typed [e~[ here.[e~["],
    },
    "mistral-small-3.2": {
        "single": ["4.</s>"],
        "system3": ["1.</s>", "2.</s>", "3.</s>"],
        "whitespace": ["  Indented.\n</s>", "\nStarts on a new line.</s>", "Ends with a tab.\t</s>"],
        "roles": ["Use [INST] and [/INST] like this.</s>", "It ends with </s> usually.</s>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "nemotron-nano-v2": {  # answers stripped, each ends \n<SPECIAL_12>; <think>\n\n opens the last one only
        "single": ["4.\n<SPECIAL_12>"],
        "system3": ["1.\n<SPECIAL_12>", "2.\n<SPECIAL_12>", "3.\n<SPECIAL_12>"],
        "whitespace": ["Indented.\n<SPECIAL_12>", "Starts on a new line.\n<SPECIAL_12>", "Ends with a tab.\n<SPECIAL_12>"],
        "roles": ["<SPECIAL_11>Assistant\nQuoted.\n<SPECIAL_12>", "Ends\n<SPECIAL_12>\nhere.\n<SPECIAL_12>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "phi-4-reasoning-vision": {  # fixed system prompt (the user's is folded); <|im_sep|>\n then the answer
        "single": ["4.<|im_end|>"],
        "system3": ["1.<|im_end|>", "2.<|im_end|>", "3.<|im_end|>"],
        "whitespace": ["  Indented.\n<|im_end|>", "\n\nStarts on a new line.<|im_end|>", "Ends with a tab.\t<|im_end|>"],
        "roles": ["A turn: <|im_end|>\n<|im_start|>assistant<|im_sep|>\nok<|im_end|>", "<|im_start|>user<|im_sep|>x<|im_end|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "qwen3.5": {  # trims content; keeps an earlier answer's reasoning; empty think block before the last only
        "single": ["4.<|im_end|>"],
        "system3": ["1.<|im_end|>", "2.<|im_end|>", "3.<|im_end|>"],
        "whitespace": ["Indented.<|im_end|>", "Starts on a new line.<|im_end|>", "Ends with a tab.<|im_end|>"],
        # the generation prompt opens <think>\n: the model never writes it, so it is not trained
        "reasoning_last": ["1.<|im_end|>", "Two is one more.\n</think>\n\n2.<|im_end|>"],
        "reasoning_both": ["Earlier thought.\n</think>\n\n1.<|im_end|>", "Two is one more.\n</think>\n\n2.<|im_end|>"],
        "roles": ["ChatML: <|im_start|>assistant\nHi<|im_end|><|im_end|>", "Done<|im_end|><|im_end|>"],
    },
    "seed-oss": {  # content trimmed; reasoning kept in every turn as <seed:think>R</seed:think>\n
        "single": ["4.<seed:eos>"],
        "system3": ["1.<seed:eos>", "2.<seed:eos>", "3.<seed:eos>"],
        "whitespace": ["Indented.<seed:eos>", "Starts on a new line.<seed:eos>", "Ends with a tab.<seed:eos>"],
        "reasoning_last": ["1.<seed:eos>", "<seed:think>Two is one more.</seed:think>\n2.<seed:eos>"],
        "reasoning_both": ["<seed:think>Earlier thought.</seed:think>\n1.<seed:eos>",
                           "<seed:think>Two is one more.</seed:think>\n2.<seed:eos>"],
        "roles": ["Write <seed:bos>assistant\nnext.<seed:eos>", "<seed:eos> early.<seed:eos>"],
    },
    "smollm3": {  # /think mode (the default): no think block; content.lstrip("\n")
        "single": ["4.<|im_end|>"],
        "system3": ["1.<|im_end|>", "2.<|im_end|>", "3.<|im_end|>"],
        "whitespace": ["  Indented.\n<|im_end|>", "Starts on a new line.<|im_end|>", "Ends with a tab.\t<|im_end|>"],
        "roles": ["ChatML: <|im_start|>assistant\nHi<|im_end|><|im_end|>", "Done<|im_end|><|im_end|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    # -- added in the second collection --
    "apriel-1.5": {  # <|assistant|>\n answer \n<|end|>\n then eos after every answer (FIXED: the end runs through eos)
        # renders a 'thought' only under add_thoughts: no reasoning field
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "functiongemma": {  # <start_of_turn>model\n, every content trimmed, <end_of_turn>; a system turn's text is replaced
        "single": ["4.<end_of_turn>"],
        "system3": ["1.<end_of_turn>", "2.<end_of_turn>", "3.<end_of_turn>"],
        "whitespace": ["Indented.<end_of_turn>", "Starts on a new line.<end_of_turn>", "Ends with a tab.<end_of_turn>"],
        "roles": ["A turn is <start_of_turn>model\nhi<end_of_turn><end_of_turn>", "Typed <end_of_turn> end.<end_of_turn>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "llama-4": {  # <|header_start|>assistant<|header_end|>\n\n answer <|eot|>; only the system prompt is trimmed
        "single": ["4.<|eot|>"],
        "system3": ["1.<|eot|>", "2.<|eot|>", "3.<|eot|>"],
        # the header's \n\n and the answer's \n tokenize as one \n\n\n: trained (docs/MASKING.md)
        "whitespace": ["  Indented.\n<|eot|>", "\n\n\nStarts on a new line.<|eot|>", "Ends with a tab.\t<|eot|>"],
        "roles": ["Type <|header_start|>assistant<|header_end|> here.<|eot|>", "And <|eot|> there.<|eot|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "magistral-small-2509": {  # a default system prompt that writes [THINK]...[/THINK] itself; [/INST]answer</s>
        "single": ["4.</s>"],
        "system3": ["1.</s>", "2.</s>", "3.</s>"],
        "whitespace": ["  Indented.\n</s>", "\nStarts on a new line.</s>", "Ends with a tab.\t</s>"],
        "roles": ["Use [THINK] and [/THINK] like this.</s>", "It ends with </s> usually.</s>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "mistral-nemo": {  # the system prompt joins the LAST user turn only: a conversation ending in an answer drops it
        "single": ["4.</s>"],
        "system3": ["1.</s>", "2.</s>", "3.</s>"],
        "whitespace": ["  Indented.\n</s>", "\nStarts on a new line.</s>", "Ends with a tab.\t</s>"],
        "roles": ["Use [INST] and [/INST] like this.</s>", "It ends with </s> usually.</s>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "phi-3.5-mini": {  # <|assistant|>\n answer <|end|>\n; eos (<|endoftext|>) once, after the whole conversation
        "single": ["4.<|end|>"],
        "system3": ["1.<|end|>", "2.<|end|>", "3.<|end|>"],
        "whitespace": ["  Indented.\n<|end|>", "\n\nStarts on a new line.<|end|>", "Ends with a tab.\t<|end|>"],
        "roles": ["Write <|assistant|>\nx<|end|><|end|>", "<|user|>\ntyped<|end|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "qwq-32b": {  # ChatML; the generation prompt opens <think>\n, which no rendered answer has; earlier answers are
        # cut after their last </think> and lstrip('\n')ed, the last one is written as given
        "single": ["4.<|im_end|>"],
        "system3": ["1.<|im_end|>", "2.<|im_end|>", "3.<|im_end|>"],
        "whitespace": ["  Indented.\n<|im_end|>", "Starts on a new line.<|im_end|>", "Ends with a tab.\t<|im_end|>"],
        "roles": ["ChatML: <|im_start|>assistant\nHi<|im_end|><|im_end|>", "Done<|im_end|><|im_end|>"],
        "think_in_answer": ["Close with </think> then.<|im_end|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    # -- added in the third collection --
    "apriel-1.6": {  # \n<|begin_assistant|>\n answer; \n<|end|>\n only when a turn follows (appended after the last);
        # user turns have no end; add_generation_prompt is forced on (a prompt after a final user turn only)
        "single": ["4.\n<|end|>"],
        "system3": ["1.\n<|end|>", "2.\n<|end|>", "3.\n<|end|>"],
        "whitespace": ["  Indented.\n\n<|end|>", "\n\nStarts on a new line.\n<|end|>", "Ends with a tab.\t\n<|end|>"],
        # reasoning is written for the conversation's last message only, then [BEGIN FINAL RESPONSE]; the generation
        # prompt's 'Here are my reasoning steps:\n' is never in a rendered answer, so the span starts at the reasoning
        "reasoning_last": ["1.\n<|end|>", "Two is one more.\n[BEGIN FINAL RESPONSE]\n2.\n<|end|>"],
        "reasoning_both": ["1.\n<|end|>", "Two is one more.\n[BEGIN FINAL RESPONSE]\n2.\n<|end|>"],
        "roles": ["Write <|begin_assistant|>\nx\n<|end|>\n<|end|>", "<|begin_user|>\ntyped\n<|end|>"],
    },
    "functionary-v3.2": {**dict.fromkeys(REASONING, NO_REASONING)},  # the answers are in FIXED
    "kimi-k2-thinking": {  # <think></think> before every answer up to the FIRST answer (the loop meant to find the last
        # non-tool-call answer runs backwards and keeps the first), <think>R</think> after it; empty blocks masked
        "single": ["4.<|im_end|>"],
        "system3": ["1.<|im_end|>", "2.<|im_end|>", "3.<|im_end|>"],
        "whitespace": ["  Indented.\n<|im_end|>", "\nStarts on a new line.<|im_end|>", "Ends with a tab.\t<|im_end|>"],
        # the generation prompt is <|im_assistant|>assistant<|im_middle|>: the model opens its think block itself
        "reasoning_last": ["1.<|im_end|>", "<think>Two is one more.</think>2.<|im_end|>"],
        "reasoning_both": ["1.<|im_end|>", "<think>Two is one more.</think>2.<|im_end|>"],
        "roles": ["I write <|im_assistant|>assistant<|im_middle|> and <|im_end|>.<|im_end|>", "Then <|im_user|>.<|im_end|>"],
    },
    "kimi-k3": {},  # every case is in FIXED
    "llama-3.3": {  # a system header always written (date preamble, the user's system after it); content trimmed
        "single": ["4.<|eot_id|>"],
        "system3": ["1.<|eot_id|>", "2.<|eot_id|>", "3.<|eot_id|>"],
        "whitespace": ["Indented.<|eot_id|>", "Starts on a new line.<|eot_id|>", "Ends with a tab.<|eot_id|>"],
        "roles": ["Type <|start_header_id|>assistant<|end_header_id|> here.<|eot_id|>", "And <|eot_id|> there.<|eot_id|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
    },
    "nemotron-3-nano": {  # <think></think> + answer, the whole trimmed (the answer's leading whitespace survives
        # behind the tag); an empty system turn always; comments outside whitespace control leave spaces before headers
        "single": ["4.<|im_end|>"],
        "system3": ["1.<|im_end|>", "2.<|im_end|>", "3.<|im_end|>"],
        "whitespace": ["  Indented.<|im_end|>", "\nStarts on a new line.<|im_end|>", "Ends with a tab.<|im_end|>"],
        # the generation prompt opens <think>\n: the model never writes it, so it is not trained
        "reasoning_last": ["1.<|im_end|>", "Two is one more.\n</think>\n2.<|im_end|>"],
        # an earlier answer's reasoning is cut to <think></think>, keeping the \n that followed </think>: rendered
        # <think></think>\n1., the \n the template's render of this answer
        "reasoning_both": ["\n1.<|im_end|>", "Two is one more.\n</think>\n2.<|im_end|>"],
        "roles": ["ChatML: <|im_start|>assistant\nHi<|im_end|><|im_end|>", "Done<|im_end|><|im_end|>"],
        "think_in_answer": Refused("label_contract", "an answer holding </think> is taken for one carrying its own "
                                   "reasoning: the template writes no <think></think> before it"),
    },
    "nemotron-super-v1.5": {  # a system header always written (empty without a system prompt); nothing trimmed
        "single": ["4.<|eot_id|>"],
        "system3": ["1.<|eot_id|>", "2.<|eot_id|>", "3.<|eot_id|>"],
        "whitespace": ["  Indented.\n<|eot_id|>", "\n\n\nStarts on a new line.<|eot_id|>", "Ends with a tab.\t<|eot_id|>"],
        # '/no_think' is cut out of the system prompt and only changes the generation prompt: answers render the same
        "no_think": ["1.<|eot_id|>", "2.<|eot_id|>"],
        "roles": ["Type <|start_header_id|>assistant<|end_header_id|> here.<|eot_id|>", "And <|eot_id|> there.<|eot_id|>"],
        **dict.fromkeys(REASONING, NO_REASONING),
        # content.split('</think>')[-1].lstrip(): the template drops what an answer writes before </think>
        "think_in_answer": Refused("label_contract", "the template rewrites the answer"),
    },
    "stepfun-3.7-flash": {  # the template reads parts itself; <think>\nR\n</think>\n before answers after the last
        # user message only (empty when no reasoning: masked like the header); nothing trimmed
        "single": ["4.<|im_end|>"],
        "system3": ["1.<|im_end|>", "2.<|im_end|>", "3.<|im_end|>"],
        "whitespace": ["  Indented.\n<|im_end|>", "\n\nStarts on a new line.<|im_end|>", "Ends with a tab.\t<|im_end|>"],
        # the generation prompt opens <think>\n: the model never writes it, so it is not trained
        "reasoning_last": ["1.<|im_end|>", "Two is one more.\n</think>\n2.<|im_end|>"],
        "reasoning_both": ["1.<|im_end|>", "Two is one more.\n</think>\n2.<|im_end|>"],
        "roles": ["ChatML: <|im_start|>assistant\nHi<|im_end|><|im_end|>", "Done<|im_end|><|im_end|>"],
        # an answer without reasoning_content is split at </think>: what precedes becomes its reasoning
        "think_in_answer": Refused("label_contract", "the template rewrites the answer"),
    },
}

DROPPED_REASONING = {"glm-4.6": 1, "lfm2.5": 1, "minimax-m2": 1, "qwen3.5": 0, "seed-oss": 0, "stepfun-3.7-flash": 1,
                     "kimi-k3": 0, "nemotron-3-nano": 1,
                     "apriel-1.6": 1, "kimi-k2-thinking": 1}
"""Earlier answers' reasoning each template drops in ``reasoning_both`` (read off the template)."""

NO_END_AFTER_LAST = (
    "the template writes {end} after an answer only when a user turn follows, nothing after the last; the engine "
    "reads 'no end of turn' off the last answer alone and appends eos into every answer, so earlier answers render "
    "{end}{end}. Right: the template's render, eos appended after the last answer only"
)
GLM_NO_END = (
    "GLM writes no end token: the next <|user|> (a GLM stop token) ends an answer, nothing follows the last; the "
    "engine appends eos into every answer's content, so <|endoftext|> lands between turns and strip() no longer "
    "trims. Right: each answer ends with the <|user|> that follows it, appended after the last (GLM's finetune)"
)
GLM_THINK = (
    "; and \\n<think> is taken for a reasoning header (every answer opens \\n<think></think>\\n), so the model is "
    "never trained to open its think block after <|assistant|>"
)
CMDR_END = (
    "an answer ends <|END_RESPONSE|><|END_OF_TURN_TOKEN|> and eos is the second; the engine assumed the first "
    "special token after an answer stops the model, so <|END_OF_TURN_TOKEN|> is never trained"
)
GIGACHAT_JSON = (
    "the template serialises list content with tojson; the content probe rejects only Python's repr ('type'), so "
    "the engine takes parts, reads JSON scaffolding into the header and drops every sample. Right: string content"
)
APRIEL_END = (
    "every answer ends \\n<|end|>\\n</s> and only eos (</s>) stops the model (<|end|> is no stop token of this "
    "family); the engine ran an end of turn through eos only where special tokens follow the first AT ONCE, so the "
    "\\n between them left </s> untrained and the model never learns to stop. Right: through eos across whitespace, "
    "unless eos follows the last answer only (Phi-3.5 writes <|endoftext|> once, after the whole conversation: its "
    "turns still end <|end|>)"
)
FUNCTIONARY_LEAD = (
    "the generation prompt ends at '>>>' and every answer is written '>>>all\\n' + content: the engine took all the "
    "template writes between a user turn and an answer's text for prompt (the header), so 'all\\n', which the model "
    "writes itself after the prompt (its recipient), was never trained. Right: trained from the end of the generation "
    "prompt on, the zoo's rule for reasoning (a decision: 'all\\n' is trained with the answer)"
)
KIMI_END = (
    "an answer ends <|close|>response<|sep|><|close|>message<|sep|><|end_of_msg|> and eos (<|end_of_msg|>) stops the "
    "model; the engine ran an end of turn through eos across special tokens and whitespace only, so the tag names "
    "between them cut it at the first <|close|>: the model never learns to close its message and stop. Right: "
    "through eos across the template's own text, where that stretch is the same after every answer"
)
KIMI_THINK = (
    "; every answer is written in a think block (thinking is on by default), empty without reasoning: masked like "
    "the header, and a reasoning answer is trained from the end of the generation prompt (<|open|>think<|sep|>) on"
)
NO_THINK = (
    "a '/no_think' system prompt (this hybrid model's non-reasoning switch) makes the template write {block} before "
    "{which}; the engine derived what precedes an answer once, in the default mode, and drops the sample. Right: "
    "{block} masked like the header"
)

# Cases the engine got wrong when the zoo was collected, now right; each reason says what the
# engine had assumed about the template, and stays as the case's documentation.
FIXED: dict[tuple[str, str], tuple[list[str], str]] = {
    ("glm-4.6", "single"): (["4.<|user|>"], GLM_NO_END),
    ("glm-4.6", "system3"): (["1.<|user|>", "2.<|user|>", "3.<|user|>"], GLM_NO_END),
    ("glm-4.6", "whitespace"): (["Indented.<|user|>", "Starts on a new line.<|user|>", "Ends with a tab.<|user|>"],
                                GLM_NO_END),
    ("glm-4.6", "roles"): (["Write <|assistant|> then stop.<|user|>", "<|user|> is typed here.<|user|>"], GLM_NO_END),
    ("glm-4.6", "reasoning_last"): (["1.<|user|>", "\n<think>Two is one more.</think>\n2.<|user|>"],
                                    GLM_NO_END + GLM_THINK),
    ("glm-4.6", "reasoning_both"): (["1.<|user|>", "\n<think>Two is one more.</think>\n2.<|user|>"],
                                    GLM_NO_END + GLM_THINK),
    **{("hy3-preview", case): (spans, NO_END_AFTER_LAST.format(end="<｜hy_eos｜>", doubled="<｜hy_eos｜><｜hy_eos｜>"))
       for case, spans in {
           "system3": ["1.<｜hy_eos｜>", "2.<｜hy_eos｜>", "3.<｜hy_eos｜>"],
           "whitespace": ["  Indented.\n<｜hy_eos｜>", "\nStarts on a new line.<｜hy_eos｜>", "Ends with a tab.\t<｜hy_eos｜>"],
           "roles": ["Write <｜hy_Assistant｜><think></think>x.<｜hy_eos｜>", "<｜hy_eos｜> typed.<｜hy_eos｜>"],
       }.items()},
    **{("apertus", case): (spans, NO_END_AFTER_LAST.format(end="<|assistant_end|>",
                                                           doubled="<|assistant_end|><|assistant_end|>"))
       for case, spans in {
           "system3": ["1.<|assistant_end|>", "2.<|assistant_end|>", "3.<|assistant_end|>"],
           "whitespace": ["  Indented.\n<|assistant_end|>", "\nStarts on a new line.<|assistant_end|>",
                          "Ends with a tab.\t<|assistant_end|>"],
           "roles": ["Write <|assistant_start|>x<|assistant_end|>.<|assistant_end|>", "<|user_start|>typed<|assistant_end|>"],
       }.items()},
    **{("command-r7b", case): ([s + "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>" for s in spans], CMDR_END)
       for case, spans in {
           "single": ["4."],
           "system3": ["1.", "2.", "3."],
           "whitespace": ["  Indented.\n", "\nStarts on a new line.", "Ends with a tab.\t"],
           "roles": ["<|START_RESPONSE|>quoted<|END_RESPONSE|>", "Turn ends <|END_OF_TURN_TOKEN|>."],
       }.items()},
    **{("gigachat3", case): (spans, GIGACHAT_JSON) for case, spans in {
        "single": ["4.<|message_sep|>"],
        "system3": ["1.<|message_sep|>", "2.<|message_sep|>", "3.<|message_sep|>"],
        # the header's \n and the answer's \n tokenize as one \n\n: trained (docs/MASKING.md)
        "whitespace": ["  Indented.\n<|message_sep|>", "\n\nStarts on a new line.<|message_sep|>",
                       "Ends with a tab.\t<|message_sep|>"],
        "roles": ["Write assistant<|role_sep|>\nhi<|message_sep|><|message_sep|>", "<|message_sep|> typed.<|message_sep|>"],
    }.items()},
    **{("apriel-1.5", case): ([s + "\n<|end|>\n</s>" for s in spans], APRIEL_END) for case, spans in {
        "single": ["4."],
        "system3": ["1.", "2.", "3."],
        # the answer's last \n and the end's first tokenize as one \n\n; the header's \n and the answer's too
        "whitespace": ["  Indented.\n", "\n\nStarts on a new line.", "Ends with a tab.\t"],
        "roles": ["Write <|assistant|>\nx\n<|end|>", "<|user|>\ntyped"],
    }.items()},
    **{("functionary-v3.2", case): (["all\n" + a for a in spans], FUNCTIONARY_LEAD) for case, spans in {
        "single": ["4.<|eot_id|>"],
        "system3": ["1.<|eot_id|>", "2.<|eot_id|>", "3.<|eot_id|>"],
        # content is not trimmed; 'all\n' and the answer's \n tokenize as one \n\n
        "whitespace": ["  Indented.\n<|eot_id|>", "\nStarts on a new line.<|eot_id|>", "Ends with a tab.\t<|eot_id|>"],
        "roles": ["Write >>>all\nx<|eot_id|><|eot_id|>", "<|start_header_id|>user<|end_header_id|> typed<|eot_id|>"],
    }.items()},
    **{("kimi-k3", case): ([a + "<|close|>response<|sep|><|close|>message<|sep|><|end_of_msg|>" for a in spans],
                          KIMI_END + (KIMI_THINK if case in REASONING else ""))
       for case, spans in {
           "single": ["4."],
           "system3": ["1.", "2.", "3."],
           "whitespace": ["  Indented.\n", "\nStarts on a new line.", "Ends with a tab.\t"],
           "roles": ["Tags: <|open|>response<|sep|>hi<|close|>response<|sep|>", "Typed <|end_of_msg|> end."],
           "reasoning_last": ["1.", "Two is one more.<|close|>think<|sep|><|open|>response<|sep|>2."],
           # the template keeps every answer's reasoning
           "reasoning_both": ["Earlier thought.<|close|>think<|sep|><|open|>response<|sep|>1.",
                              "Two is one more.<|close|>think<|sep|><|open|>response<|sep|>2."],
       }.items()},
    ("smollm3", "no_think"): (["1.<|im_end|>", "2.<|im_end|>"],
                              NO_THINK.format(block="<think>\\n\\n</think>\\n", which="every answer")),
    ("nemotron-nano-v2", "no_think"): (["1.\n<SPECIAL_12>", "2.\n<SPECIAL_12>"],
                                       NO_THINK.format(block="<think></think>", which="the last answer")),
}


def _params() -> list[Any]:
    params = [pytest.param(name, case, id=f"{name}-{case}") for name, cases in EXPECTED.items() for case in cases]
    params += [pytest.param(name, case, id=f"{name}-{case}") for name, case in FIXED]
    return params


def expectation(name: str, case: str) -> list[str] | Refused:
    return FIXED[(name, case)][0] if (name, case) in FIXED else EXPECTED[name][case]


@pytest.mark.parametrize(("name", "case"), _params())
def test_each_answer_is_trained_with_its_end_and_nothing_else(encoder_for: Any, name: str, case: str) -> None:
    from cardtune.errors import SampleError

    encoder = encoder_for(name)
    want = expectation(name, case)
    if isinstance(want, Refused):
        with pytest.raises(SampleError) as refused:
            encoder.encode(make_sample(name, case))
        assert refused.value.reason == want.reason, want.why
        return
    encoded = encoder.encode(make_sample(name, case))
    assert trained(encoder, encoded) == want
    if case == "reasoning_both":
        assert encoded.dropped_reasoning == DROPPED_REASONING[name]
    conv = conversation(name, case)
    if not (conv.system and FAMILIES[name].drops_system):
        # every token is the template's own render (one bos), the appended end after the last answer aside
        text = encoder.tokenizer.decode(encoded.input_ids, clean_up_tokenization_spaces=False)
        assert text == own_render(encoder, name, conv)


def test_expectations_cover_every_template() -> None:
    names = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
    assert names == sorted(FAMILIES) == sorted(EXPECTED) == sorted(TYPED_ROLES)
    assert {name for name, _ in FIXED} <= set(FAMILIES)
    assert not {key for key in FIXED if key[1] in EXPECTED[key[0]]}, "a case is both expected and fixed"


IMAGE_PLACEHOLDERS = {
    "apriel-1.6": "<|begin_user|>\n[IMG]What is shown?\n<|begin_assistant|>",
    "gemma-4": "<|turn>user\n\n\n<|image|>\n\nWhat is shown?<turn|>",
    "llama-4": "<|header_start|>user<|header_end|>\n\n<|image|>What is shown?<|eot|>",
    "magistral-small-2509": "[INST][IMG]What is shown?[/INST]",
    "kimi-k2-thinking": "<|im_user|>user<|im_middle|><|media_start|>image<|media_content|><|media_pad|><|media_end|>\nWhat is shown?",
    "kimi-k3": '<|open|>message role="user"<|sep|><|kimi_image_placeholder|>What is shown?<|close|>message<|sep|><|end_of_msg|>',
    "kimi-k2": "<|im_user|>user<|im_middle|><|media_start|>image<|media_content|><|media_pad|><|media_end|>What is shown?",
    "lfm2.5": "<|im_start|>user\n<image>What is shown?<|im_end|>",
    "mistral-small-3.2": "[INST][IMG]What is shown?[/INST]",
    "qwen3.5": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>",
    "stepfun-3.7-flash": "<|im_start|>user\n<im_patch>What is shown?<|im_end|>",
}


@pytest.mark.parametrize("name", sorted(IMAGE_PLACEHOLDERS))
def test_an_image_part_reaches_the_template_as_a_part(encoder_for: Any, name: str) -> None:
    """Templates that read image parts get them (the placeholder is the template's own), with a
    text-only tokenizer: what a processor would expand."""
    from cardtune.conversation import Sample

    encoder = encoder_for(name)
    assert encoder.roles.content == "parts"
    user = [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    sample = Sample(f"{name}/image", [{"role": "user", "content": user},
                                      {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
                    images=["img0.png"])
    rendered = encoder.render(sample)
    assert IMAGE_PLACEHOLDERS[name] in rendered
