"""Exact sample lengths from image headers: how many media tokens an image of a given size
becomes, without decoding it or running the image processor.

:class:`ImageTokenCounter` asks the model's own processing code, in this order:

1. ``image_processor.get_number_of_image_patches(height, width)`` divided by ``merge_size**2``:
   transformers' public method (Qwen2-VL, Qwen2.5-VL), and the very arithmetic the qwen2-vl
   collator applies to ``image_grid_thw`` when no processor can be built here;
2. ``processor._get_num_multimodal_tokens(image_sizes=...)``: the only entry point transformers
   offers for the fixed (llava-1.5) and anyres (llava-1.6, onevision) counts. It is underscored,
   but it is the documented contract vLLM relies on ("Do not remove"), and copying its
   arithmetic here would be worse;
3. otherwise, the real encoder run once per distinct size on a blank image (mllama: one
   ``<|image|>`` per image whatever its tiles).

:class:`HeaderEncoder` encodes a sample whose images are :class:`~cardtune.data.media.ImageHeader`
with the real engine: the same normalisation, template, role location, labels and truncation;
only the processor call is replaced by the tokenizer plus each image token repeated to its
count. It checks itself against the real processor on probe images before it is used, so a
family whose processor writes anything else around its image tokens falls back to decoding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from cardtune.conversation import Media, Sample
from cardtune.data.media import ImageHeader
from cardtune.errors import SampleError

PROBE_SIZES: tuple[tuple[int, int], ...] = ((333, 250), (1000, 230), (224, 640))
"""(width, height) of the blank images the header path is checked on: odd sizes, both orientations
and a wide one, so anyres grids and patch rounding differ between them."""


def _probe_sample(images: int = 1) -> Sample:
    return Sample(
        "media-token-probe",
        [{"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": "What is this?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A probe."}]}],
        images=["probe"] * images,
    )


class ImageTokenCounter:
    """Media tokens one image of ``(width, height)`` becomes; ``method`` says where the count comes from."""

    def __init__(self, processing: Any, measure: Callable[[tuple[int, int]], int]) -> None:
        self._cache: dict[tuple[int, int], int] = {}
        image_processor = processing.image_processor
        processor = processing.processor
        if hasattr(image_processor, "get_number_of_image_patches") and getattr(image_processor, "merge_size", None):
            merge = image_processor.merge_size ** 2
            self.method = "image_processor.get_number_of_image_patches"
            self._count = lambda w, h: image_processor.get_number_of_image_patches(h, w, {}) // merge
        elif processor is not None and self._processor_counts(processor):
            self.method = "processor._get_num_multimodal_tokens"
            self._count = lambda w, h: int(processor._get_num_multimodal_tokens(image_sizes=[(h, w)]).num_image_tokens[0])
        else:
            self.method = "measured per size with the real encoder"
            self._count = lambda w, h: measure((w, h))

    @staticmethod
    def _processor_counts(processor: Any) -> bool:
        try:
            return bool(processor._get_num_multimodal_tokens(image_sizes=[(336, 336)]).num_image_tokens)
        except (AttributeError, NotImplementedError, KeyError, TypeError):
            return False

    def __call__(self, width: int, height: int) -> int:
        key = (width, height)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = int(self._count(width, height))
        return found


class HeaderEncoder:
    """A :class:`~cardtune.collators.engine.ChatEncoder` for samples whose images are headers.

    ``encode(sample, media)`` gives the same ``input_ids``/``labels`` as the real encoder on the
    decoded images, without ``media_tensors``. Build it with :meth:`from_encoder`, which returns
    None (and why) when the family's counts cannot be had from headers.
    """

    def __init__(self, engine: Any, counter: ImageTokenCounter) -> None:
        self.engine = engine
        self.counter = counter

    @classmethod
    def for_encoder(cls, encoder: Any) -> tuple[Any, str]:
        """:meth:`from_encoder` of ``encoder``, or of the engine it wraps (a preference pair's
        encoder: ``engine``, ``with_engine``), wrapped again around the header encoder."""
        engine = getattr(encoder, "engine", None)
        if engine is None:
            return cls.from_encoder(encoder)
        header, note = cls.from_encoder(engine)
        return (encoder.with_engine(header.engine) if header is not None else None), note

    @classmethod
    def from_encoder(cls, encoder: Any) -> tuple[HeaderEncoder | None, str]:
        """(header encoder, note) for ``encoder``; (None, why) where it would not be exact."""
        if not encoder.card.load_image or not {"image"} & set(encoder.card.modalities):
            return None, "no decoded images in this family"
        processing = encoder.processing
        media = encoder.card.media
        if media.image_placeholder and media.image_placeholder != media.image_token:
            return None, (f"the processor expands {media.image_placeholder!r} into more than {media.image_token!r} "
                          "tokens: images are decoded in validation")
        token = getattr(processing.processor, "image_token", None) or media.image_token
        token_id = encoder.tokenizer.convert_tokens_to_ids(token) if token and "{" not in token else None
        if not isinstance(token_id, int) or token_id not in encoder.media_token_ids:
            return None, f"no single image token to expand ({token!r})"
        probe = _probe_sample()

        def measure(size: tuple[int, int]) -> int:
            from PIL import Image

            encoded = encoder.encode(probe, Media(images=[Image.new("RGB", size)]))
            return encoded.input_ids.count(token_id)

        counter = ImageTokenCounter(processing, measure)
        handler = _HeaderSizedHandler(encoder.handler, counter, token_id)
        # A copy keeps every setting of the encoder (max_length, typed control tokens, a model's
        # length limit); only the handler differs.
        engine = copy.copy(encoder)
        engine.handler = handler
        header = cls(engine, counter)
        try:
            for size in PROBE_SIZES:
                want = encoder.encode(probe, Media(images=[_blank(size)]))
                got = header.encode(probe, Media(images=[ImageHeader("PNG", *size, 1, "RGB")]))
                if (got.input_ids, got.labels) != (want.input_ids, want.labels):
                    return None, (f"counts from {counter.method} differ from the processor's on a {size[0]}x{size[1]} "
                                  "image; images are decoded in validation")
            # several images in one sample: the same counts each, or (LLaVA-OneVision's multi-image
            # form) others, which are then measured per sample on blank images of the header sizes
            two = _probe_sample(images=2)
            want = encoder.encode(two, Media(images=[_blank(size) for size in PROBE_SIZES[:2]]))
            got = header.encode(two, Media(images=[ImageHeader("PNG", *size, 1, "RGB") for size in PROBE_SIZES[:2]]))
            handler.measure_several = (got.input_ids, got.labels) != (want.input_ids, want.labels)
        except SampleError as exc:
            return None, f"the probe sample did not encode ({exc}); images are decoded in validation"
        several = "; a sample of several images measured on blank images" if handler.measure_several else ""
        return header, f"image tokens counted from headers ({counter.method}{several})"

    @property
    def card(self) -> Any:
        return self.engine.card

    def encode(self, sample: Sample, media: Media | None = None) -> Any:
        return self.engine.encode(sample, media)


def _blank(size: tuple[int, int]) -> Any:
    from PIL import Image

    return Image.new("RGB", size)


class _HeaderSizedHandler:
    """The family's media handler with its processor call replaced, for header-only media:
    the rendered text through the tokenizer, each image token repeated to its count."""

    def __init__(self, handler: Any, counter: ImageTokenCounter, image_token_id: int) -> None:
        self._handler = handler
        self._counter = counter
        self._token_id = image_token_id
        self.measure_several = False
        """Several images in one sample count otherwise than alone: measured on blank images."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)

    def tokenize(
        self, text: str, sample: Sample, media: Media | None, *, sanitize: bool = False,
    ) -> tuple[list[int], dict[str, Any]]:
        images = list(media.images) if media is not None else []
        if not images or (media is not None and media.videos) or not all(isinstance(i, ImageHeader) for i in images):
            return self._handler.tokenize(text, sample, media, sanitize=sanitize)
        if self.measure_several and len(images) > 1:
            blanks = Media(images=[_blank((i.width, i.height)) for i in images])
            return self._handler.tokenize(text, sample, blanks, sanitize=sanitize)[0], {}
        self._handler.check_media(text, sample, media)
        ids = self._handler.tokenize_batch([text], sanitize=sanitize)[0]
        at = [i for i, t in enumerate(ids) if t == self._token_id]
        if len(at) != len(images):
            raise SampleError(sample.id, "images", "placeholder_mismatch",
                              f"{len(at)} image tokens in the rendered text for {len(images)} images", sample.source)
        out: list[int] = []
        start = 0
        for pos, image in zip(at, images, strict=True):
            out += ids[start:pos]
            out += [self._token_id] * self._counter(image.width, image.height)
            start = pos + 1
        out += ids[start:]
        return out, {}
