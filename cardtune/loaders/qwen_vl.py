"""Qwen-VL-Chat's tokenizer, built natively from ``qwen.tiktoken`` (no remote code).

Upstream, ``QWenTokenizer`` is remote code over tiktoken. Its public definition is small and
rebuilt here as a ``tokenizers`` byte-level BPE: the regular tokens are the ranks of
``qwen.tiktoken`` (merges follow from the ranks), the pre-tokenizer is Qwen's tiktoken
pattern, text is NFC-normalised first, and the special tokens follow from id 151643 in
upstream order. Tests check the ids against tiktoken itself.

One behaviour is not BPE: ``<img>PATH</img>`` becomes ``<img>``, the UTF-8 bytes of PATH as
ids 0..255, ``<imgpad>`` up to 256 tokens, ``</img>``; the model reads the path back from those
ids to load the image. :class:`QwenVLTokenizer` applies it after BPE and undoes it in decode.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from cardtune.loaders import register_loader
from cardtune.loaders.generic import GenericLoader

log = logging.getLogger(__name__)

TIKTOKEN_FILE = "qwen.tiktoken"
PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
IMAGE_START, IMAGE_END, IMAGE_PAD = "<img>", "</img>", "<imgpad>"
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    IMAGE_START,
    IMAGE_END,
    IMAGE_PAD,
)
IMAGE_SPAN = 256
"""Tokens between ``<img>`` and ``</img>``: the path's bytes, then ``<imgpad>``."""


def _cache_dir() -> Path:
    from cardtune.demo.cache import cache_root

    return cache_root()


def build_backend(tiktoken_file: str | Path) -> Any:
    """The ``tokenizers.Tokenizer`` equivalent to Qwen's tiktoken encoding of ``tiktoken_file``."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=PATTERN).converted()
    # QWenTokenizer.tokenize normalises to NFC before it looks for special tokens, so special
    # tokens match the normalised text too (">" + U+0338 composes to "≯" and ends no token).
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=True) for token in SPECIAL_TOKENS])
    first_special = backend.token_to_id(SPECIAL_TOKENS[0])
    if (
        first_special != backend.get_vocab_size() - len(SPECIAL_TOKENS)
        or backend.token_to_id(IMAGE_PAD) != first_special + len(SPECIAL_TOKENS) - 1
    ):
        raise ValueError(f"{tiktoken_file}: the special tokens did not land in upstream order")
    return backend


def backend_file(tiktoken_file: str | Path) -> Path:
    """A tokenizer.json for ``tiktoken_file``, built once and cached under ``$CARDTUNE_CACHE`` (``~/.cache/cardtune/``)
    keyed by the file's sha256 (deriving the merges takes seconds; reading the json, one)."""
    digest = hashlib.sha256(Path(tiktoken_file).read_bytes()).hexdigest()[:32]
    name = f"qwen-tiktoken-{digest}.tokenizer.json"
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "cardtune"):
        path = folder / name
        if path.is_file():
            return path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{name}.{os.getpid()}.tmp"
            build_backend(tiktoken_file).save(str(tmp))
            os.replace(tmp, path)
            return path
        except OSError as exc:  # a read-only home: try the temporary folder
            log.info("could not cache the Qwen tokenizer in %s (%s)", folder, exc)
    raise OSError(f"could not write the tokenizer built from {tiktoken_file} to any cache folder")


def __getattr__(name: str) -> Any:
    # The tokenizer class subclasses transformers' and is built on first use, so importing
    # this module (which registers the loader) stays as light as the rest of cardtune.loaders.
    if name == "QwenVLTokenizer":
        return _tokenizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _tokenizer_class() -> type:
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import TruncationStrategy
    from transformers.utils import PaddingStrategy

    class QwenVLTokenizer(PreTrainedTokenizerFast):
        """Qwen-VL-Chat's tokenizer: byte-level BPE plus the ``<img>PATH</img>`` expansion."""

        @property
        def image_ids(self) -> tuple[int, int, int]:
            """(``<img>``, ``</img>``, ``<imgpad>``) ids."""
            return tuple(self.convert_tokens_to_ids([IMAGE_START, IMAGE_END, IMAGE_PAD]))  # type: ignore[return-value]

        # -- encode ---------------------------------------------------------------------------
        def _expand_images(self, row: dict[str, list[Any]]) -> dict[str, list[Any]]:
            """One encoded row with each ``<img>`` ... ``</img>`` span replaced by its path bytes
            and padding; ``offset_mapping`` etc. follow (inner tokens map to the path's characters)."""
            start, end, pad = self.image_ids
            ids = row["input_ids"]
            if start not in ids:
                return row
            out: dict[str, list[Any]] = {key: [] for key in row}
            i = 0
            while i < len(ids):
                if ids[i] != start:
                    for key in row:
                        out[key].append(row[key][i])
                    i += 1
                    continue
                try:
                    j = ids.index(end, i + 1)
                except ValueError:
                    raise ValueError(
                        f"unclosed {IMAGE_START} in the text: every image path ends with {IMAGE_END}"
                    ) from None
                path = self._tokenizer.decode(ids[i + 1 : j], skip_special_tokens=False).encode("utf-8")
                if len(path) > IMAGE_SPAN:
                    raise ValueError(f"image path longer than {IMAGE_SPAN} bytes: {path[:60]!r}...")
                inner = [*path, *[pad] * (IMAGE_SPAN - len(path))]
                for key in row:
                    if key == "input_ids":
                        out[key] += [start, *inner, end]
                    elif key == "offset_mapping":
                        offsets = row[key]
                        span = (offsets[i][1], offsets[j][0])
                        out[key] += [offsets[i], *[span] * IMAGE_SPAN, offsets[j]]
                    elif key == "special_tokens_mask":
                        out[key] += [1, *[0] * IMAGE_SPAN, 1]
                    else:  # token_type_ids, attention_mask: constant over the span
                        out[key] += [row[key][i]] * (IMAGE_SPAN + 2)
                i = j + 1
            return out

        def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> Any:
            texts = [text] if isinstance(text, str) else text
            # Marked text (typed control tokens as plain text) is encoded piece by piece through
            # ``encode``, which expands each piece's image spans itself.
            if kwargs.get("sanitize_control_tokens") or not any(isinstance(t, str) and IMAGE_START in t for t in texts or ()):
                return super()._encode_plus(text, text_pair, **kwargs)
            unsupported = [k for k in ("is_split_into_words", "return_overflowing_tokens") if kwargs.get(k)]
            if text_pair is not None or unsupported:
                raise NotImplementedError(
                    f"{type(self).__name__}: text with {IMAGE_START} spans cannot be encoded with "
                    f"{', '.join(unsupported or ['text_pair'])}"
                )
            padding = kwargs.pop("padding_strategy", PaddingStrategy.DO_NOT_PAD)
            truncation = kwargs.pop("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE)
            max_length = kwargs.pop("max_length", None)
            pad_kwargs = {
                "pad_to_multiple_of": kwargs.pop("pad_to_multiple_of", None),
                "padding_side": kwargs.pop("padding_side", None),
                "return_attention_mask": kwargs.pop("return_attention_mask", None),
                "return_tensors": kwargs.pop("return_tensors", None),
            }
            return_length = kwargs.pop("return_length", False)
            kwargs.pop("stride", None)
            # Expand first, then truncate and pad the expanded rows: the Rust side would cut at
            # the wrong place (transformers' own marked-chat encoding does the same).
            encoded = super()._encode_plus(texts, None, return_attention_mask=False, **kwargs)
            rows = [self._expand_images({key: encoded[key][n] for key in encoded}) for n in range(len(texts))]
            if truncation != TruncationStrategy.DO_NOT_TRUNCATE and max_length is not None:
                keep = (
                    slice(None, max_length) if self.truncation_side == "right" else slice(-max_length, None)
                )
                rows = [{key: values[keep] for key, values in row.items()} for row in rows]
            batch = {key: [row[key] for row in rows] for key in rows[0]}
            if return_length:
                batch["length"] = [len(row["input_ids"]) for row in rows]
            if isinstance(text, str):
                batch = {key: values[0] for key, values in batch.items()}
            return self.pad(batch, padding=padding, max_length=max_length, **pad_kwargs)

        # -- decode ---------------------------------------------------------------------------
        def _collapse_images(self, ids: list[int]) -> list[int]:
            """Expanded image spans back to ``<img>`` + the path's BPE ids + ``</img>``."""
            start, end, pad = self.image_ids
            if start not in ids:
                return ids
            out: list[int] = []
            i = 0
            while i < len(ids):
                j = i + IMAGE_SPAN + 1
                inner = ids[i + 1 : j]
                if (
                    ids[i] == start
                    and j < len(ids)
                    and ids[j] == end
                    and all(t < 256 or t == pad for t in inner)
                ):
                    path = bytes(t for t in inner if t != pad).decode("utf-8", errors="replace")
                    out += [start, *self._tokenizer.encode(path, add_special_tokens=False).ids, end]
                    i = j + 1
                else:
                    out.append(ids[i])
                    i += 1
            return out

        def _decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            return super()._decode(self._collapse_images(list(token_ids)), skip_special_tokens, **kwargs)

    QwenVLTokenizer.__qualname__ = "QwenVLTokenizer"  # pickles by name, through __getattr__
    return QwenVLTokenizer


def load_qwen_vl_tokenizer(path: str | Path, revision: str | None = None) -> Any:
    """The tokenizer of a Qwen-VL folder or hub id: from ``qwen.tiktoken`` (the upstream
    files) or from the ``tokenizer.json`` a cardtune run saved."""
    from transformers.utils import cached_file

    folder = Path(path)
    if (folder / "tokenizer.json").is_file() and not (folder / TIKTOKEN_FILE).is_file():
        return _tokenizer_class().from_pretrained(str(folder))
    tiktoken_file = cached_file(str(path), TIKTOKEN_FILE, revision=revision)
    config_file = Path(tiktoken_file).parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return _tokenizer_class()(
        tokenizer_file=str(backend_file(tiktoken_file)),
        name_or_path=str(path),
        model_max_length=config.get("model_max_length", 8192),
        clean_up_tokenization_spaces=False,
    )


@register_loader("qwen-vl")
class QwenVLLoader(GenericLoader):
    """Qwen-VL-Chat: the native tokenizer above; the rest is the generic loader."""

    def load_tokenizer(self) -> Any:
        return self._finish_tokenizer(load_qwen_vl_tokenizer(self.path, self.revision))
