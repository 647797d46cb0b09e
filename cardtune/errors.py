"""Per-sample errors: every bad sample is reported with its id, its field and a reason code.

Reason codes are stable strings, counted in summaries (``validate-data``, training's skip report).
"""

from __future__ import annotations

from typing import Any

REASONS: dict[str, str] = {
    "missing_media": "media file not found",
    "unreadable_media": "media file cannot be read",
    "corrupt_image": "image cannot be decoded",
    "image_too_large": "image has more pixels than the limit (a decompression bomb, or a scan to downsize first)",
    "path_escape": "media path escapes its folder",
    "placeholder_mismatch": "media placeholders do not match the media given",
    "empty_turn": "a turn has no text",
    "non_string_turn": "a turn's text is not a string",
    "roles_not_alternating": "user and assistant turns do not alternate",
    "unknown_role": "a turn has an unknown role",
    "empty_answer": "an assistant answer is empty",
    "no_assistant_turn": "the sample has no assistant turn",
    "too_long": "longer than the model takes, or than --max_length without cutting media or every answer",
    "empty_labels": "no token would be trained",
    "template_error": "the chat template refused the conversation",
    "label_contract": "supervised tokens do not decode to the assistant answers",
    "bad_format": "the record is not a sample of any known format",
    "unsupported_media": "the model does not take this kind of media",
    "same_answers": "a preference pair's chosen and rejected answers are the same",
    "prompt_mismatch": "a preference pair's prompt is not the same tokens before its chosen and its rejected answer",
}


class SampleError(ValueError):
    """A sample that cannot be trained as it is; names the sample, the field and why."""

    def __init__(self, sample_id: str, field: str, reason: str, detail: str = "", source: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        self.sample_id = sample_id
        self.field = field
        self.reason = reason
        self.detail = detail
        self.source = source
        where = f" ({source})" if source else ""
        super().__init__(f"sample {sample_id}{where}: {field}: {reason}: {detail or REASONS[reason]}")

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException pickles ``self.args`` (the one formatted message) and would call
        # ``SampleError(message)``: rebuild from the fields instead, so DataLoader workers
        # and multiprocessing pools can send it back. Extra attributes travel as state.
        fields = (self.sample_id, self.field, self.reason, self.detail, self.source)
        return type(self), fields, self.__dict__.copy() or None

    def to_dict(self) -> dict[str, str]:
        return {
            "id": self.sample_id,
            "field": self.field,
            "reason": self.reason,
            "detail": self.detail or REASONS[self.reason],
            "source": self.source,
        }
