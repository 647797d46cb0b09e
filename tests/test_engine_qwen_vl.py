"""Qwen-VL-Chat images: each image part gets its path, written into the prompt as
``Picture N: <img>PATH</img>`` and tokenized into 256 tokens (``load_image: false``).

The expected ids are built without cardtune: the text is written out by hand from Qwen's
``make_context`` format, tokenized with tiktoken over the fixture's ``qwen.tiktoken``
(``QwenTiktoken`` of the golden tests), and each ``<img>...</img>`` span is replaced as
upstream's ``QWenTokenizer`` does: ``<img>``, the path's UTF-8 bytes as ids 0..255,
``<imgpad>`` up to 256 tokens, ``</img>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import require_fixture

IGNORE = -100
MODEL = "qwen-vl-chat"
IMG_START, IMG_END, IMG_PAD = 151857, 151858, 151859  # upstream order, from 151643
SPAN = 256


@pytest.fixture(scope="module")
def encoder() -> Any:
    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model

    r = resolve_model(MODEL, require_fixture(MODEL))
    return ChatEncoder(r.card, load_processing(r))


@pytest.fixture(scope="module")
def tiktoken_ref() -> Any:
    pytest.importorskip("tiktoken")
    from test_labels_golden import QwenTiktoken

    return QwenTiktoken(require_fixture(MODEL) / "qwen.tiktoken")


def user(text: str, images: int = 0) -> dict[str, Any]:
    return {"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]}


def answer(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def two_image_sample(images: list[Any]) -> Any:
    from cardtune.conversation import Sample

    return Sample("qvl-2", [user("Describe the first picture.", 1), answer("A red square."),
                            user("And this one?", 1), answer("A blue rectangle.")], images=images, source="t.json[0]")


def reference(ref: Any, path1: str, path2: str) -> tuple[str, list[int], list[int]]:
    """(text, input_ids, labels) of the 2-image sample, piece by piece; labelled pieces are the
    answers with their <|im_end|>."""
    pieces: list[tuple[str, bool]] = [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
         f"<|im_start|>user\nPicture 1: <img>{path1}</img>\nDescribe the first picture.<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("A red square.<|im_end|>", True),
        (f"\n<|im_start|>user\nPicture 2: <img>{path2}</img>\nAnd this one?<|im_end|>\n<|im_start|>assistant\n", False),
        ("A blue rectangle.<|im_end|>", True),
        ("\n", False),
    ]

    def expand(ids: list[int]) -> list[int]:
        out, i = [], 0
        while i < len(ids):
            if ids[i] != IMG_START:
                out.append(ids[i])
                i += 1
                continue
            j = ids.index(IMG_END, i)
            path = ref.decode(ids[i + 1 : j]).encode("utf-8")
            out += [IMG_START, *path, *[IMG_PAD] * (SPAN - len(path)), IMG_END]
            i = j + 1
        return out

    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = expand(ref(text)["input_ids"])
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    text = "".join(t for t, _ in pieces)
    assert expand(ref(text)["input_ids"]) == ids  # the pieces tokenize as the whole does
    return text, ids, labels


def write_images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (220, 20, 20)).save(folder / "red.png")
    Image.new("RGB", (8, 8), (20, 40, 220)).save(folder / "blue.png")
    return folder


def image_spans(ids: list[int]) -> list[tuple[int, int]]:
    return [(i, ids.index(IMG_END, i) + 1) for i, t in enumerate(ids) if t == IMG_START]


def test_two_images_two_turns_exact_ids(encoder, tiktoken_ref, tmp_path):
    from cardtune.data.media import MediaConfig, load_media

    folder = write_images(tmp_path / "imgs")
    s = two_image_sample(["red.png", "blue.png"])
    # what training does: load_image false gives the paths resolved under --image-folder
    media = load_media(s, MediaConfig.from_card(encoder.card, image_folder=str(folder)))
    assert media.images == [str(folder / "red.png"), str(folder / "blue.png")]
    text, want_ids, want_labels = reference(tiktoken_ref, *media.images)

    assert encoder.render(s, media) == text
    e = encoder.encode(s, media)
    assert e.input_ids == want_ids
    assert e.labels == want_labels
    assert e.media_tensors == {}  # the model loads the images from the paths itself
    # each <img>..</img> span: the path's bytes, padded to 256, never labelled
    spans = image_spans(e.input_ids)
    assert [b - a for a, b in spans] == [SPAN + 2, SPAN + 2]
    for (a, b), path in zip(spans, media.images, strict=True):
        inner = e.input_ids[a + 1 : b - 1]
        assert bytes(t for t in inner if t != IMG_PAD).decode() == path
        assert e.labels[a:b] == [IGNORE] * (b - a)
    # the prompt reads "Picture 1: <img>PATH1</img>\n"
    picture_1 = tiktoken_ref("Picture 1: ")["input_ids"]
    a, _ = spans[0]
    assert e.input_ids[a - len(picture_1) : a] == picture_1
    assert e.input_ids[spans[0][1]] == tiktoken_ref("\nDescribe")["input_ids"][0]
    # answers + <|im_end|> exactly
    decoded = [encoder.tokenizer.decode(e.input_ids[lo:hi]) for lo, hi in _runs(e.labels)]
    assert decoded == ["A red square.<|im_end|>", "A blue rectangle.<|im_end|>"]


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, lab in enumerate([*labels, IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


def test_without_media_the_paths_are_the_samples_as_given(encoder, tiktoken_ref):
    s = two_image_sample(["imgs/red.png", Path("imgs/blue.png")])
    text, want_ids, want_labels = reference(tiktoken_ref, "imgs/red.png", "imgs/blue.png")
    assert encoder.render(s) == text
    e = encoder.encode(s)
    assert (e.input_ids, e.labels) == (want_ids, want_labels)
    # a Hugging Face Image feature with decode=False carries its path
    e2 = encoder.encode(two_image_sample([{"path": "imgs/red.png", "bytes": None}, "imgs/blue.png"]))
    assert e2.input_ids == want_ids
    # the text-only fast path renders the same paths
    (b,) = encoder.encode_batch([s])
    assert (b.input_ids, b.labels) == (want_ids, want_labels)


@pytest.mark.parametrize("images", [["a.png"], [], ["a.png", "b.png", "c.png"]])
def test_count_mismatch_is_placeholder_mismatch(encoder, images):
    from cardtune.conversation import Media
    from cardtune.errors import SampleError

    s = two_image_sample(images)
    for media in (None, Media(images=list(images)) if images else None):
        with pytest.raises(SampleError) as err:
            encoder.encode(s, media)
        assert (err.value.reason, err.value.sample_id, err.value.field) == ("placeholder_mismatch", "qvl-2", "images")
        assert f"2 image placeholders for {len(images)} images" in str(err.value)
    (b,) = encoder.encode_batch([s])
    assert isinstance(b, SampleError) and b.reason == "placeholder_mismatch"


def test_images_that_are_not_paths_are_refused(encoder):
    from PIL import Image

    from cardtune.errors import SampleError

    for bad, field, words in ((Image.new("RGB", (4, 4)), "images[1]", "reads images by path"),
                              ("x/" * 130 + "a.png", "images", "longer than 256 bytes")):
        with pytest.raises(SampleError) as err:
            encoder.encode(two_image_sample(["red.png", bad]))
        assert (err.value.reason, err.value.field, err.value.sample_id) == ("unsupported_media", field, "qvl-2")
        assert words in str(err.value)


def test_truncation_never_cuts_an_image_span(encoder):
    from cardtune.errors import SampleError

    full = encoder.encode(two_image_sample(["red.png", "blue.png"]))
    (_, _), (second, end) = image_spans(full.input_ids)
    short = type(encoder)(encoder.card, encoder.processing, max_length=second + 10)
    with pytest.raises(SampleError) as err:
        short.encode(two_image_sample(["red.png", "blue.png"]))
    assert err.value.reason == "too_long"
    keep = end + 12  # past the second image, inside the second answer: cut there
    e = type(encoder)(encoder.card, encoder.processing, max_length=keep).encode(two_image_sample(["red.png", "blue.png"]))
    assert e.input_ids == full.input_ids[:keep] and e.labels == full.labels[:keep]
    assert e.labels[-1] != IGNORE and e.num_truncated == len(full) - keep


def test_a_quoted_turn_next_to_an_image_does_not_steal_the_labels(encoder, tiktoken_ref):
    from cardtune.conversation import Sample

    quote = "Is this a turn?\n<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
    s = Sample("qvl-quote", [user(quote, 1), answer("42")], images=["red.png"])
    e = encoder.encode(s)
    (lo, hi), = _runs(e.labels)
    assert encoder.tokenizer.decode(e.input_ids[lo:hi]) == "42<|im_end|>"
    header = list(encoder.roles.assistant_header)
    last = max(i for i in range(len(e.input_ids)) if e.input_ids[i : i + len(header)] == header)
    assert lo == last + len(header)


def test_validation_encodes_with_the_resolved_paths(encoder, tmp_path):
    from cardtune.datasets import ConversationDataset, validate

    folder = write_images(tmp_path / "imgs")
    good = two_image_sample(["red.png", "blue.png"])
    missing = two_image_sample(["red.png", "gone.png"])
    missing.id = "qvl-missing"
    report = validate([good, missing], encoder, image_folder=str(folder))
    assert [(p.error.sample_id, p.error.field, p.error.reason) for p in report.problems] == [
        ("qvl-missing", "images[1]", "missing_media")]
    # the training dataset encodes with the same paths
    item = ConversationDataset.for_card([good], encoder.card, encoder, image_folder=str(folder))[0]
    assert item.input_ids == encoder.encode(good, _media(folder)).input_ids
    a, b = image_spans(item.input_ids)[1]
    assert bytes(t for t in item.input_ids[a + 1 : b - 1] if t != IMG_PAD).decode() == str(folder / "blue.png")


def _media(folder: Path) -> Any:
    from cardtune.conversation import Media

    return Media(images=[str(folder / "red.png"), str(folder / "blue.png")])
