"""Special-token fix-ups and the native Qwen-VL-Chat tokenizer, on the real fixture files.

The Qwen-VL tokenizer is checked against tiktoken itself (the engine of the upstream remote
code) on a few hundred varied strings, and against the upstream special-token layout.
"""

from __future__ import annotations

import base64
import functools
import random
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from conftest import require_fixture

QWEN_SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|extra_0|>": 151646,
    "<|extra_1|>": 151647,
    "<|extra_204|>": 151850,
    "<ref>": 151851,
    "</ref>": 151852,
    "<box>": 151853,
    "</box>": 151854,
    "<quad>": 151855,
    "</quad>": 151856,
    "<img>": 151857,  # config.json's visual.image_start_id
    "</img>": 151858,
    "<imgpad>": 151859,
}


def card(family: str) -> Any:
    from cardtune.registry import get_registry

    return get_registry().families[family]


@functools.cache
def _qwen_loaded() -> tuple[Any, Any]:
    from cardtune.loaders.qwen_vl import QwenVLLoader

    loader = QwenVLLoader(card("qwen-vl"), require_fixture("qwen-vl-chat"))
    return loader, loader.load_tokenizer()


@pytest.fixture
def qwen() -> Any:
    """The native tokenizer with the card's fix-ups, loaded once (tests must not mutate it)."""
    return _qwen_loaded()[1]


def fresh_phi2() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_fixture("phi-2"), trust_remote_code=False)


# -- the card's fix-ups through the loaders -------------------------------------------------------
def test_qwen_vl_card_fixups_give_the_moe_llava_ids() -> None:
    loader, tok = _qwen_loaded()
    report = loader.fixup_report
    assert report.ids == {"pad": 151646, "unk": 151646, "bos": 151647, "eos": 151643}
    assert report.tokens == {
        "pad": "<|extra_0|>",
        "unk": "<|extra_0|>",
        "bos": "<|extra_1|>",
        "eos": "<|endoftext|>",
    }
    assert report.added == [] and not report.needs_resize and not report.pad_is_eos and report.shared == []
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [
        151646,
        151647,
        151643,
        151646,
    ]
    assert len(tok) == 151860
    # bos is named, not added: Qwen never wrote one.
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok.padding_side == "right"


def test_phi2_card_allows_shared_tokens_and_flags_pad_eos() -> None:
    from cardtune.loaders.generic import GenericLoader

    loader = GenericLoader(card("phi-2"), require_fixture("phi-2"))
    tok = loader.load_tokenizer()
    report = loader.fixup_report
    assert report.ids == {"pad": 50256, "unk": 50256, "bos": 50256, "eos": 50256}
    assert report.shared == [("bos", "eos", "unk")] and report.pad_is_eos and report.added == []
    assert tok.pad_token_id == tok.eos_token_id == 50256 and len(tok) == 50295
    assert report.lines() == [
        "special tokens: pad '<|endoftext|>' (50256), unk '<|endoftext|>' (50256), "
        "bos '<|endoftext|>' (50256), eos '<|endoftext|>' (50256)",
        "pad set to existing token '<|endoftext|>' (card)",
        "shared (card allows it): bos = eos = unk",
        "pad == eos: padding must be found by the attention mask, never by id, or eos labels are lost",
    ]


# -- apply_special_token_fixups directly ----------------------------------------------------------
def test_collision_is_refused_with_the_exact_message() -> None:
    from cardtune.loaders.fixups import apply_special_token_fixups
    from cardtune.registry import CardError
    from cardtune.registry.schema import SpecialTokens

    with pytest.raises(CardError) as info:
        apply_special_token_fixups(fresh_phi2(), SpecialTokens(), where="family phi-2: chat.special_tokens")
    assert str(info.value) == (
        "family phi-2: chat.special_tokens: bos, eos and unk must be distinct tokens, but "
        "bos = eos = unk = '<|endoftext|>' (id 50256). Give distinct tokens in the card (a missing one "
        "is added), or set allow_shared: true if the model was trained with them shared"
    )


def test_collision_made_by_the_card_is_refused_and_absent_tokens_never_collide() -> None:
    from cardtune.loaders.fixups import apply_special_token_fixups
    from cardtune.loaders.qwen_vl import load_qwen_vl_tokenizer
    from cardtune.registry import CardError
    from cardtune.registry.schema import SpecialTokens

    tok = load_qwen_vl_tokenizer(require_fixture("qwen-vl-chat"))
    # Upstream QWenTokenizer defines none of them.
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (None,) * 4
    report = apply_special_token_fixups(tok, SpecialTokens(eos="<|endoftext|>"))  # bos, unk stay None
    assert report.tokens == {"pad": None, "unk": None, "bos": None, "eos": "<|endoftext|>"}
    assert report.lines()[-1] == "no pad token: set chat.special_tokens.pad in the card"
    with pytest.raises(CardError) as info:
        apply_special_token_fixups(tok, SpecialTokens(bos="<|endoftext|>"))
    assert str(info.value).startswith(
        "chat.special_tokens: bos, eos and unk must be distinct tokens, but bos = eos = '<|endoftext|>' (id 151643)."
    )


def test_added_pad_is_reported_and_takes_the_next_id() -> None:
    from cardtune.loaders.fixups import apply_special_token_fixups
    from cardtune.registry.schema import SpecialTokens

    tok = fresh_phi2()
    before = len(tok)
    report = apply_special_token_fixups(tok, SpecialTokens(pad="<|pad|>", unk="<|pad|>", allow_shared=True))
    assert report.added == ["<|pad|>"] and report.needs_resize
    assert report.assigned == {"unk": "<|pad|>"}  # reuses the token just added: added once
    assert len(tok) == before + 1 and tok.pad_token_id == tok.unk_token_id == len(tok) - 1 == 50295
    assert report.shared == [("bos", "eos")] and not report.pad_is_eos
    assert "added to the vocabulary: '<|pad|>'; resize the embeddings" in report.lines()
    assert tok("a<|pad|>", add_special_tokens=False)["input_ids"] == [64, 50295]


# -- the native Qwen-VL tokenizer ------------------------------------------------------------------
def test_qwen_special_tokens_in_upstream_order(qwen: Any) -> None:
    assert len(qwen) == 151860
    assert {t: qwen.convert_tokens_to_ids(t) for t in QWEN_SPECIALS} == QWEN_SPECIALS
    assert qwen.convert_ids_to_tokens(list(range(151646, 151851))) == [f"<|extra_{i}|>" for i in range(205)]


def _tiktoken_reference() -> Any:
    import tiktoken

    from cardtune.loaders.qwen_vl import PATTERN, SPECIAL_TOKENS

    lines = (require_fixture("qwen-vl-chat") / "qwen.tiktoken").read_bytes().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    specials = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)


CORPUS = [
    "Hello world",
    "Hello, world! How's it going? I'LL be there; they'RE late, we'd've known.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\r\n\n\nmany",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", a[i]); }',
    "1234567890 3.14159 -42 1e-9 0x1F 1,000,000",
    "你好，世界！今天天气怎么样？我很好，谢谢。",
    "日本語のテキスト、カタカナとひらがな。한국어 텍스트입니다.",
    "Emoji: 🦙🔥👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "Ünïcödé àccénts: café, naïve, coöperate, Straße, ǅ",
    "e\u0301 composed by NFC, Å vs A\u030a, ﬁ ligature, ①②③",
    "Русский текст и العربية و हिन्दी",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|endoftext|>",
    "<ref>the cat</ref><box>(10,20),(30,40)</box><quad>x</quad><|extra_7|>",
    "<|im_end|\u0338 a special token broken by composition",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "' ''' \"\"\" `code` ~~strike~~ **bold** __x__",
    "\u00a0\u2009\u3000 odd spaces \u200b zero width",
    "",
]


def _random_corpus(n: int) -> list[str]:
    rng = random.Random(20240601)
    ranges = [
        (0x20, 0x7E), (0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x400, 0x4FF),
        (0x1F300, 0x1FAFF), (0x0, 0x1F), (0xA0, 0x24F), (0x600, 0x6FF), (0x900, 0x97F),
        (0x2000, 0x206F), (0x300, 0x36F),
    ]  # fmt: skip
    extras = [" ", "  ", "\n", "\r\n", "\t", " \n\n ", "'s", "'LL", " 123456", "<|im_end|>", "<|endoftext|>"]
    texts = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(1, 25)):
            lo, hi = rng.choice(ranges)
            pieces.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
            if rng.random() < 0.3:
                pieces.append(rng.choice(extras))
        texts.append("".join(pieces))
    return texts


def test_qwen_tokenizer_matches_tiktoken(qwen: Any) -> None:
    reference = _tiktoken_reference()
    texts = CORPUS + _random_corpus(400)
    ours = qwen(texts, add_special_tokens=False)["input_ids"]
    mismatches = []
    for text, ids in zip(texts, ours, strict=True):
        # QWenTokenizer.tokenize normalises to NFC, then encodes with every special token allowed.
        expected = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        if ids != expected:
            mismatches.append((text, ids[:12], expected[:12]))
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:2]}"
    assert ours[0] == [9707, 1879]
    for text, ids in zip(CORPUS, ours[: len(CORPUS)], strict=True):
        assert qwen.decode(ids) == unicodedata.normalize("NFC", text)


def test_qwen_image_paths_become_256_byte_ids(qwen: Any) -> None:
    text = "Picture 1: <img>a/b.jpg</img>\nWhat?"
    enc = qwen(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    picture, path, tail = (
        [24669, 220, 16, 25, 220],
        list(b"a/b.jpg"),
        [198, 3838, 30],
    )  # "Picture 1: ", "\nWhat?"
    assert ids == [*picture, 151857, *path, *[151859] * (256 - len(path)), 151858, *tail]
    assert enc["offset_mapping"][6] == (16, 23) and text[16:23] == "a/b.jpg"
    assert qwen.decode(ids) == text
    assert qwen.decode(ids, skip_special_tokens=True) == "Picture 1: a/b.jpg\nWhat?"
    batch = qwen(
        ["x <img>p.png</img> y", "short"], padding=True, return_tensors="pt", add_special_tokens=False
    )
    assert tuple(batch["input_ids"].shape) == (2, 261) and batch["attention_mask"].sum(1).tolist() == [261, 1]
    assert qwen("<img>p.png</img> y", truncation=True, max_length=4)["input_ids"] == [151857, 112, 46, 112]
    with pytest.raises(ValueError, match="unclosed <img>"):
        qwen("<img>no end")
    with pytest.raises(ValueError, match="image path longer than 256 bytes"):
        qwen("<img>" + "x" * 257 + "</img>")


def test_qwen_tokenizer_saves_and_reloads(qwen: Any, tmp_path: Path) -> None:
    import pickle

    from cardtune.loaders.qwen_vl import load_qwen_vl_tokenizer

    qwen.save_pretrained(tmp_path)
    again = load_qwen_vl_tokenizer(tmp_path)
    assert type(again) is type(qwen) and len(again) == 151860
    assert again("x <img>a</img>")["input_ids"][:4] == [87, 220, 151857, 97]
    # The class is built on first use; it still pickles by name (DataLoader workers, datasets.map).
    assert pickle.loads(pickle.dumps(type(qwen))) is type(qwen)


def test_backend_is_cached_by_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny tiktoken file: the 256 bytes plus two merges."""
    import hashlib

    from cardtune.loaders import qwen_vl

    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"abc"]
    vocab = tmp_path / "qwen.tiktoken"
    vocab.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))
    monkeypatch.setenv("CARDTUNE_CACHE", str(tmp_path / "cache"))
    path = qwen_vl.backend_file(vocab)
    digest = hashlib.sha256(vocab.read_bytes()).hexdigest()[:32]
    assert path == tmp_path / "cache" / f"qwen-tiktoken-{digest}.tokenizer.json"
    stamp = path.stat().st_mtime_ns
    assert qwen_vl.backend_file(vocab) == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(path))
    assert backend.encode("abcab").ids == [257, 256] and backend.token_to_id("<|endoftext|>") == 258
