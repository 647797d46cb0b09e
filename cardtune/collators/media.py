"""Media handling per family, and batching: what truly differs between families.

A handler formats message content for the template, tokenizes the rendered text together
with the sample's media (media tokens expanded), and pads a batch. The masking itself is
the engine's (:mod:`cardtune.collators.engine`), shared by all.
"""

from __future__ import annotations

from typing import Any

from cardtune.collators import register_collator
from cardtune.conversation import Processing, Sample
from cardtune.errors import SampleError
from cardtune.registry.schema import FamilyCard

IGNORE_INDEX = -100


@register_collator("default")
class DefaultCollator:
    """Processor-driven families (llava, llava-next, onevision, mllama...), text-only ones, and
    families whose images are paths in the prompt (``load_image: false``, Qwen-VL-Chat)."""

    def __init__(self, card: FamilyCard, processing: Processing, pad_to_multiple_of: int | None = None) -> None:
        self.card = card
        self.processing = processing
        self.tokenizer = processing.tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of
        self._batch_aligned: frozenset[str] | None = None

    # -- content -------------------------------------------------------------------------
    def media_token_ids(self) -> set[int]:
        ids: set[int] = set()
        tok = self.tokenizer
        for text in (self.card.media.image_token, self.card.media.video_token,
                     getattr(tok, "image_token", None), getattr(tok, "video_token", None)):
            if text and "{" not in text:
                tid = tok.convert_tokens_to_ids(text)
                if isinstance(tid, int) and tid != tok.unk_token_id:
                    ids.add(tid)
        # a tokenizer that expands image paths itself (Qwen-VL's <img>, </img>, <imgpad>)
        ids.update(i for i in getattr(tok, "image_ids", ()) if isinstance(i, int))
        return ids

    def format_messages(
        self, messages: list[dict[str, Any]], form: str, *, sample: Sample | None = None, media: Any | None = None,
    ) -> list[dict[str, Any]]:
        """Content as the template reads it: a list of parts, or one string with placeholders.
        With ``load_image: false`` each image part also gets its path (:meth:`_with_paths`)."""
        counters = {"image": 0, "video": 0}
        out = []
        for m in messages:
            content = m["content"]
            if form == "parts":
                if isinstance(content, str):
                    content = [{"type": "text", "text": content}]
            elif not isinstance(content, str):
                pieces = []
                for part in content:
                    if part["type"] == "text":
                        pieces.append(part["text"])
                    else:
                        counters[part["type"]] += 1
                        pieces.append(self._placeholder(part["type"], counters[part["type"]]) + "\n")
                content = "".join(pieces)
            out.append({**m, "content": content})
        if not self.card.load_image and sample is not None:
            return self._with_paths(out, sample, media)
        return out

    def _with_paths(self, messages: list[dict[str, Any]], sample: Sample, media: Any | None) -> list[dict[str, Any]]:
        """Images as paths in the prompt (Qwen-VL-Chat: the card's template writes
        ``Picture N: <img>PATH</img>``, the tokenizer turns it into 256 tokens and the model
        loads the image from the path): the n-th image part gets the n-th path, from the loaded
        media (the path resolved under ``--image-folder``) or, with no media given, the sample's
        images as the data gives them."""
        refs = list(media.images) if media is not None else list(sample.images)
        parts = sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image")
        if parts != len(refs):
            raise SampleError(sample.id, "images", "placeholder_mismatch",
                              f"{parts} image placeholders for {len(refs)} images", sample.source)
        if not refs:
            return messages
        paths = iter([self._image_path(ref, i, sample) for i, ref in enumerate(refs)])
        return [
            m if isinstance(m["content"], str) else
            {**m, "content": [{**p, "image": next(paths)} if p["type"] == "image" else p for p in m["content"]]}
            for m in messages
        ]

    def _image_path(self, ref: Any, index: int, sample: Sample) -> str:
        import os

        if isinstance(ref, dict) and not ref.get("bytes"):  # an HF Image feature with decode=False
            ref = ref.get("path")
        if not isinstance(ref, (str, os.PathLike)) or not os.fspath(ref):
            raise SampleError(sample.id, f"images[{index}]", "unsupported_media",
                              f"{self.card.family} reads images by path (written into the prompt), not a "
                              f"{type(ref).__name__}", sample.source)
        return os.fspath(ref)

    def _placeholder(self, kind: str, n: int) -> str:
        token = self.card.media.placeholder(kind)
        if not token:
            raise ValueError(f"card {self.card.family}: media.{kind}_token is needed to write {kind}s into string content")
        return token.replace("{n}", str(n))

    # -- tokenize ------------------------------------------------------------------------
    def check_media(self, text: str, sample: Sample, media: Any | None) -> None:
        """Every media part has its media and every media its part, checked before tokenizing:
        a part with no image would be ONE unexpanded image token with no pixels (the model fails
        later: features != tokens), and a processor's own ValueError would not name the sample.
        Where the card's placeholder (what the template writes for one, which the processor
        expands) is a fixed token, its count in the rendered text must agree too (a placeholder
        typed in the text is expanded by the processor like any other).
        Images given by path were counted where their paths were written."""
        if not self.card.load_image:
            return
        counts = {"image": 0, "video": 0}
        for m in sample.messages:
            if not isinstance(m["content"], str):
                for p in m["content"]:
                    if p["type"] in counts:
                        counts[p["type"]] += 1
        for kind, parts in counts.items():
            given = len(getattr(media, f"{kind}s")) if media is not None else 0
            token = self.card.media.placeholder(kind)
            in_text = text.count(token) if token and "{" not in token else parts
            if parts != given or in_text != given:
                detail = (f"{parts} {kind} placeholders for {given} {kind}s" if parts != given else
                          f"{in_text} {token} in the rendered text for {given} {kind}s")
                raise SampleError(sample.id, f"{kind}s", "placeholder_mismatch", detail, sample.source)

    def tokenize(
        self, text: str, sample: Sample, media: Any | None, *, sanitize: bool = False,
    ) -> tuple[list[int], dict[str, Any]]:
        """``sanitize``: the messages were marked (:mod:`cardtune.collators.control`): typed
        control tokens are encoded as plain text."""
        self.check_media(text, sample, media)
        if not self.card.load_image:  # the paths are in the text: the tokenizer does the rest
            try:
                return self.tokenize_batch([text], sanitize=sanitize)[0], {}
            except ValueError as exc:  # a path the tokenizer cannot take (Qwen-VL: over 256 bytes)
                raise SampleError(sample.id, "images", "unsupported_media", str(exc), sample.source) from None
        images = list(media.images) if media is not None else []
        videos = list(media.videos) if media is not None else []
        if not images and not videos:
            return self.tokenize_batch([text], sanitize=sanitize)[0], {}
        return self._tokenize_media(text, sample, images, videos, sanitize)

    def tokenize_batch(self, texts: list[str], *, sanitize: bool = False) -> list[list[int]]:
        """Text-only renders in one call: the tokenizer's batch path runs in parallel."""
        if not sanitize:
            backend = self._plain_backend()
            if backend is not None:
                return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(texts, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]

    def tokenize_batch_with_offsets(self, texts: list[str]) -> tuple[list[list[int]], list[Any] | None]:
        """Text-only renders in one call, with each token's character span where the tokenizer
        gives them (a fast tokenizer): per text, a list of ``(start, end)`` or the tokenizers
        ``Encoding`` that holds them. Spans are then checked against the text, not decoded."""
        if not getattr(self.tokenizer, "is_fast", False):
            return self.tokenize_batch(texts), None
        backend = self._plain_backend()
        if backend is not None:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encodings], encodings  # offsets read a token at a time (TextView)
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def _plain_backend(self) -> Any:
        """The tokenizers backend, where calling it is exactly what the tokenizer's own call
        does (transformers' ``TokenizersBackend`` calls ``backend_tokenizer.encode_batch`` after
        turning the backend's truncation and padding off and setting its special-token
        splitting): a class that encodes its own way, or a backend whose settings differ, goes
        through the tokenizer. Skips transformers' conversion of every encoding to lists and
        dicts, which the labels do not need."""
        from transformers import TokenizersBackend

        tok = self.tokenizer
        if not isinstance(tok, TokenizersBackend) or any(
                getattr(type(tok), name) is not getattr(TokenizersBackend, name) for name in ("__call__", "_encode_plus")):
            return None  # a class with its own call (Code Llama's infilling, Qwen-VL's image paths, ...)
        backend = tok.backend_tokenizer
        if backend.truncation is not None or backend.padding is not None or \
                backend.encode_special_tokens != bool(tok.split_special_tokens):
            return None
        return backend

    def _tokenize_media(
        self, text: str, sample: Sample, images: list, videos: list, sanitize: bool = False,
    ) -> tuple[list[int], dict[str, Any]]:
        processor = self.processing.processor
        if processor is None:
            raise SampleError(sample.id, "image" if images else "video", "unsupported_media",
                              f"no processor for family {self.card.family} on this machine", sample.source)
        if videos and self.processing.video_unavailable:
            raise SampleError(sample.id, "video", "unsupported_media",
                              f"{self.processing.video_unavailable}; install torchvision for videos", sample.source)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
        if sanitize:
            kwargs["sanitize_control_tokens"] = True
        if images:
            # one sample's images, nested as one batch entry: LLaVA-OneVision encodes a sample of
            # several images in its multi-image form (no anyres), as it was trained; the other
            # processors give the same either way
            kwargs["images"] = [images]
        if videos:
            kwargs["videos"] = videos
        try:
            out = processor(**kwargs)
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:  # the processor names no sample
            expanded = self._expand_then_sanitize(text, kwargs) if sanitize else None
            if expanded is None:
                raise SampleError(sample.id, "images" if images else "videos", "unsupported_media",
                                  f"the processor refused it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                                  sample.source) from None
            return expanded
        ids = out["input_ids"][0].tolist()
        tensors = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        return ids, tensors

    def _expand_then_sanitize(self, text: str, kwargs: dict[str, Any]) -> tuple[list[int], dict[str, Any]] | None:
        """Typed control tokens as text for a processor that cannot take ``sanitize_control_tokens``
        itself (Idefics3 and SmolVLM count each image's tokens with ``char_to_token``, which the
        tokenizer's sanitizing path does not provide): the processor expands the media and says
        what it wrote for each placeholder (``return_text_replacement_offsets``), and the
        expanded text is then tokenized with sanitizing, as the processor would have done.
        None where the processor cannot say (the caller reports its first error)."""
        plain = {k: v for k, v in kwargs.items() if k != "sanitize_control_tokens"}
        try:
            out = self.processing.processor(**plain, return_text_replacement_offsets=True)
            replacements = sorted(out["text_replacement_offsets"][0], key=lambda r: r["span"][0])
        except Exception:  # noqa: BLE001 - any failure: the processor's first refusal is the one to report
            return None
        pieces, cursor = [], 0
        for r in replacements:
            start, end = r["span"]
            pieces += [text[cursor:start], r["replacement"]]
            cursor = end
        expanded = "".join(pieces) + text[cursor:]
        ids = self.tokenizer([expanded], add_special_tokens=False, sanitize_control_tokens=True)["input_ids"][0]
        n = len(out["input_ids"][0])
        tensors = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "text_replacement_offsets")}
        if any(is_per_token(v, n) for v in tensors.values()):
            return None  # per-token tensors follow the unsanitized ids: they cannot be re-aligned here
        return list(ids), tensors

    # -- batch ---------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return candidate
        return 0

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        import torch

        longest = max(len(f.input_ids) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        input_ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f.input_ids)
            input_ids[row, :n] = torch.tensor(f.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(f.labels, dtype=torch.long)
            attention[row, :n] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if any(f.media_tensors for f in features):
            batch.update(batch_media([f.media_tensors for f in features], [len(f.input_ids) for f in features],
                                     longest, self.batch_aligned_keys()))
        return batch

    def batch_aligned_keys(self) -> frozenset[str]:
        """The processor outputs with one row per SAMPLE (Mllama's ``pixel_values`` of shape
        (1, images, tiles, ...)), as opposed to one row per image or patch (llava, Qwen2-VL):
        read off the processor once, with a two-image prompt."""
        if self._batch_aligned is None:
            self._batch_aligned = frozenset()
            processor, token = self.processing.processor, self.card.media.placeholder("image")
            if processor is not None and token and "{" not in token:
                from PIL import Image

                probe = [Image.new("RGB", (32, 32)), Image.new("RGB", (48, 32))]
                try:
                    out = processor(text=[f"{token}\n{token}\nx"], images=probe, return_tensors="pt", add_special_tokens=False)
                except Exception:  # noqa: BLE001 - a processor that refuses two images: none are
                    return self._batch_aligned
                self._batch_aligned = frozenset(k for k, v in out.items()
                                                if k not in ("input_ids", "attention_mask") and getattr(v, "shape", (0,))[0] == 1)
        return self._batch_aligned


def is_per_token(tensor: Any, length: int) -> bool:
    """A media tensor with one row per token of its sample, shape (1, ``length``, ...)
    (Qwen2-VL's ``mm_token_type_ids``, Mllama's ``cross_attention_mask``)."""
    return getattr(tensor, "dim", lambda: 0)() >= 2 and tensor.shape[0] == 1 and tensor.shape[1] == length


def batch_media(per_sample: list[dict[str, Any]], lengths: list[int], longest: int,
                batch_aligned: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The media tensors of a batch.

    - Per-token tensors (shape (1, tokens, ...): Qwen2-VL's ``mm_token_type_ids``, Mllama's
      ``cross_attention_mask``) get one row per sample, padded to the batch's length with zeros
      (text tokens; no image attended), and zero rows for samples without them.
    - Per-sample tensors (``batch_aligned``: Mllama's ``pixel_values``, ``aspect_ratio_ids``)
      get one row per sample too, inner dimensions (images, tiles) padded with zeros.
    - Everything else is per image or patch: concatenated along the first axis (llava's
      ``pixel_values``, Qwen2-VL's patches and ``image_grid_thw``); text-only samples add none.
    """
    import torch

    keys = sorted({k for d in per_sample for k in d})
    out: dict[str, Any] = {}
    for key in keys:
        present = [(row, d[key]) for row, d in enumerate(per_sample) if key in d]
        per_token = all(is_per_token(t, lengths[row]) for row, t in present)
        if per_token or key in batch_aligned:
            first = present[0][1]
            inner = [max(t.shape[i] for _, t in present) for i in range(1, first.dim())]
            if per_token:
                inner[0] = longest
            batch = torch.zeros((len(per_sample), *inner), dtype=first.dtype)
            for row, t in present:
                batch[(row, *[slice(0, n) for n in t.shape[1:]])] = t[0]
            out[key] = batch
            continue
        tensors = [t for _, t in present]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) > 1:  # e.g. llava-next patch counts differ between images: pad with zeros
            target = [max(s[i] for s in shapes) for i in range(len(next(iter(shapes))))]
            tensors = [_pad_to(t, target) for t in tensors]
        out[key] = torch.cat(tensors, dim=0)
    return out


def _pad_to(t: Any, target: list[int]) -> Any:
    import torch.nn.functional as F

    pad: list[int] = []
    for have, want in zip(reversed(t.shape[1:]), reversed(target), strict=True):
        pad += [0, want - have]
    return F.pad(t, pad)
