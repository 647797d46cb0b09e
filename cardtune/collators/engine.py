"""The one masking engine: render with the model's template, tokenize, locate, label, verify.

1. The conversation is normalised to what the template accepts (adjacent text parts joined;
   string or parts content; a system prompt folded into the first user turn where the template
   would drop or refuse it; the card's end-of-turn appended to every answer where the template
   writes none; media payloads where the family's template writes them).
2. It is rendered with the model's own ``apply_chat_template``; the family's media handler
   checks the media placeholders against the media given, then tokenizes (the processor for
   VLMs, so media tokens are expanded first).
   Control tokens typed inside a message are plain text unless the run keeps them
   (:mod:`cardtune.collators.control`: marked before rendering, as transformers does).
3. In the final ``input_ids``, each assistant turn is located by its header ids and closed by
   its end-of-turn ids (both derived from the template, :mod:`cardtune.collators.roles`).
   A span counts only if its tokens decode to that turn's answer (with its reasoning, where the
   template renders it), and an answer that itself contains the end-of-turn string is followed
   to its real end. A header whose last token merged with the answer's first character
   (ChatML ``\n`` + ``\n...``, ``[/INST]`` + ``[...``) starts the span at the merged token.
   Where header occurrences outnumber answers, which are typed inside messages and which is
   each answer's own is read off the rendered conversation (each text's character span, the
   render tokenized with offsets): a typed one never opens a span.
4. Labels are the input ids on those spans, -100 elsewhere. A sample whose spans do not match
   its answers, or that has none left after truncation, raises :class:`SampleError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cardtune.collators.media import is_per_token
from cardtune.collators.roles import close_last_answer, render_chat
from cardtune.conversation import Media, Processing, Sample, is_preference, join_text_parts, message_text
from cardtune.errors import SampleError
from cardtune.registry.schema import FamilyCard

IGNORE_INDEX = -100


@dataclass
class Encoded:
    sample_id: str
    input_ids: list[int]
    labels: list[int]
    media_tensors: dict[str, Any] = field(default_factory=dict)
    num_truncated: int = 0
    typed_control_tokens: int = 0
    """Control-token strings typed inside the sample's messages (plain text unless kept)."""
    dropped_reasoning: int = 0
    """Assistant turns whose reasoning the template does not render (Qwen3 renders it only
    after the last user message): only their answers are trained."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _first_of(ids: list[int], patterns: tuple[tuple[int, ...], ...], start: int) -> tuple[int, int] | None:
    """(index, length) of the earliest occurrence of any of ``patterns`` at or after ``start``
    (the longest where several start there), or None."""
    if len(patterns) == 1:
        at = _find(ids, patterns[0], start)
        return (at, len(patterns[0])) if at >= 0 else None
    best: tuple[int, int] | None = None
    for pattern in patterns:
        at = _find(ids, pattern, start)
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(pattern) > best[1])):
            best = (at, len(pattern))
    return best


def _find(ids: list[int], pattern: tuple[int, ...], start: int) -> int:
    """Index of the first occurrence of ``pattern`` in ``ids`` at or after ``start``, or -1."""
    n, first = len(pattern), pattern[0]
    i = start
    end = len(ids) - n
    while i <= end:
        try:
            i = ids.index(first, i, end + 1)
        except ValueError:
            return -1
        if n == 1 or tuple(ids[i : i + n]) == pattern:
            return i
        i += 1
    return -1


class TextView:
    """The rendered text under a run of tokens, from the tokenizer's offsets: a span is checked
    against its answer by comparing source characters, without decoding (the fast path)."""

    __slots__ = ("span_of", "shift", "text")

    def __init__(self, text: str, offsets: Any, shift: int = 0) -> None:
        """``offsets``: each token's ``(start, end)`` in ``text``, as a list or as the tokenizers
        ``Encoding`` itself, asked a token at a time (``token_to_chars``): a span needs two of
        them, and building every token's pair in Python costs more than the labels. ``shift``:
        ids in front of the text's tokens (a bos cardtune adds)."""
        self.text, self.shift = text, shift
        self.span_of = getattr(offsets, "token_to_chars", None) or offsets.__getitem__

    def chars(self, start: int, end: int) -> str | None:
        """The text under tokens ``[start, end)``; None where the tokenizer gives no offsets."""
        start, end = max(start - self.shift, 0), end - self.shift
        if end <= start:
            return ""
        first, last = self.span_of(start), self.span_of(end - 1)
        return self.text[first[0] : last[1]] if first is not None and last is not None else None


@dataclass
class Answer:
    """One assistant turn as the data gives it: its text and its reasoning ("" when none)."""

    text: str
    reasoning: str = ""
    reasoning_rendered: bool = False
    """Set when located: whether the template wrote the reasoning into this turn."""


class ChatEncoder:
    """Turns a :class:`Sample` into exact ``input_ids`` and ``labels`` for one model."""

    def __init__(
        self,
        card: FamilyCard,
        processing: Processing,
        *,
        max_length: int | None = None,
        handler: Any | None = None,
        typed_control_tokens: str = "plain",
    ) -> None:
        from cardtune.collators import COLLATORS
        from cardtune.collators.control import TYPED_CONTROL_TOKENS, TypedControlTokens
        from cardtune.collators.roles import derive_role_tokens, template_kwargs

        if typed_control_tokens not in TYPED_CONTROL_TOKENS:
            raise ValueError(f"typed_control_tokens: one of {TYPED_CONTROL_TOKENS}, not {typed_control_tokens!r}")
        self.card = card
        self.processing = processing
        self.tokenizer = processing.tokenizer
        self.max_length = max_length
        self.handler = handler or COLLATORS[card.collator](card, processing)
        renderer = processing.renderer
        self.roles = derive_role_tokens(renderer, self.tokenizer, card.chat, media=card.is_multimodal and card.load_image)
        self._template_kwargs = template_kwargs(renderer, card.chat)
        self.media_token_ids = self.handler.media_token_ids()
        self.control = TypedControlTokens(self.tokenizer, renderer.chat_template, self.media_token_ids)
        self.keep_typed_control_tokens = typed_control_tokens == "keep"
        self._answer_norm: dict[str, str] = {}
        closings = self.roles.closings
        # each end of turn whole, then (where it starts with text: deepseek's "\n<|EOT|>") its
        # special token alone, for an answer whose last characters merged with that text
        self._closing_tiers = [closings] + ([tuple(dict.fromkeys(c[-1:] for c in closings))]
                                            if any(len(c) > 1 for c in closings) else [])

    # -- 1. normalise ---------------------------------------------------------------------
    def normalise(self, sample: Sample, media: Media | None = None, *, typed: int | None = None) -> list[dict[str, Any]]:
        """``typed``: the sample's count of typed control tokens, when already counted."""
        roles = self.roles
        if is_preference(sample):  # its two sequences are a pair's (collators.pairs), never one conversation
            raise SampleError(sample.id, "messages", "bad_format", "a preference record (chosen and rejected "
                              "answers): train it with --method dpo", sample.source)
        messages = [{**m, "content": join_text_parts(m["content"])} for m in sample.messages]
        if self._sanitize(sample, typed):
            messages = self.control.mark(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise SampleError(sample.id, "messages", "no_assistant_turn", source=sample.source)
        with_media = bool(sample.count_parts("image") or sample.count_parts("video"))
        policy = roles.system_with_media if with_media else roles.system
        if messages and messages[0]["role"] == "system" and policy != "native":
            if policy == "reject":
                raise SampleError(
                    sample.id, "messages[0]", "template_error",
                    f"family {self.card.family} refuses system prompts (card: chat.system: reject)", sample.source,
                )
            system, messages = messages[0], messages[1:]
            first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
            if first_user is not None:
                m = messages[first_user]
                sys_text = message_text(system)
                content = m["content"]
                if isinstance(content, str):
                    content = f"{sys_text}\n\n{content}"
                else:
                    content = self._prepend_text(content, sys_text + "\n\n")
                messages[first_user] = {**m, "content": content}
        if roles.appended_end_of_turn:
            messages = [
                {**m, "content": self._append_text(m["content"], roles.appended_end_of_turn)}
                if m["role"] == "assistant" else m
                for m in messages
            ]
        messages = [self._reasoning_field(m, i, sample) if "reasoning_content" in m else m for i, m in enumerate(messages)]
        formatted = self.handler.format_messages(messages, roles.content, sample=sample, media=media)
        if roles.system_content == "string" and formatted and formatted[0]["role"] == "system":
            formatted[0] = {**formatted[0], "content": message_text(formatted[0])}
        return formatted

    def _sanitize(self, sample: Sample, typed: int | None = None) -> bool:
        """Whether the sample's typed control tokens are to be encoded as plain text."""
        if self.keep_typed_control_tokens:
            return False
        return bool(self.control.count(sample.messages) if typed is None else typed)

    def _reasoning_field(self, message: dict[str, Any], index: int, sample: Sample) -> dict[str, Any]:
        """An assistant's reasoning under the field the template reads (``reasoning_content``,
        ``thinking``); a template that renders none refuses the sample rather than drop it."""
        reasoning = message.get("reasoning_content")
        if reasoning is None:
            return message
        field_name = self.roles.reasoning_field
        if field_name is None:
            raise SampleError(
                sample.id, f"messages[{index}].reasoning_content", "template_error",
                f"the chat template of family {self.card.family} does not render reasoning: give a template "
                "that does (a reasoning model's), or leave reasoning out of the data", sample.source,
            )
        out = {k: v for k, v in message.items() if k != "reasoning_content"}
        out[field_name] = reasoning
        return out

    @staticmethod
    def _prepend_text(parts: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
        for i, p in enumerate(parts):
            if p["type"] == "text":
                return [*parts[:i], {"type": "text", "text": text + p["text"]}, *parts[i + 1 :]]
        return [*parts, {"type": "text", "text": text.rstrip()}]

    @staticmethod
    def _append_text(content: Any, text: str) -> Any:
        if isinstance(content, str):
            return content + text
        for i in range(len(content) - 1, -1, -1):
            if content[i]["type"] == "text":
                return [*content[:i], {"type": "text", "text": content[i]["text"] + text}, *content[i + 1 :]]
        return [*content, {"type": "text", "text": text}]

    # -- 2. render and tokenize -----------------------------------------------------------
    def render(self, sample: Sample, media: Media | None = None) -> str:
        return self._render(self.normalise(sample, media), sample)

    def _render(self, messages: list[dict[str, Any]], sample: Sample) -> str:
        try:
            return self._apply_template(messages)
        except Exception as exc:  # noqa: BLE001 - templates raise their own exception types
            raise SampleError(sample.id, "messages", "template_error", str(exc), sample.source) from None

    def _apply_template(self, messages: Any) -> Any:
        """The render of one conversation, or of a batch of them (a list of lists), with the end
        of turn a template writes only between turns written after a last answer too."""
        rendered = render_chat(self.processing.renderer, messages, self._template_kwargs)
        after_last = self.roles.after_last
        if after_last is None:
            return rendered
        if messages and isinstance(messages[0], dict):
            return close_last_answer(rendered, after_last) if messages[-1]["role"] == "assistant" else rendered
        return [close_last_answer(text, after_last) if conv and conv[-1]["role"] == "assistant" else text
                for conv, text in zip(messages, rendered, strict=True)]

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        """Normalised ``messages`` rendered with the generation prompt (inference, ``cardtune
        chat``), with the same template arguments as training (a frozen date)."""
        return render_chat(self.processing.renderer, messages, {**self._template_kwargs, "add_generation_prompt": True})

    def tokenize(self, text: str, sample: Sample, media: Media | None) -> tuple[list[int], dict[str, Any]]:
        ids, tensors = self.handler.tokenize(text, sample, media, sanitize=self._sanitize(sample))
        return self._with_bos(ids), tensors

    def _with_bos(self, ids: list[int]) -> list[int]:
        """bos exactly once: added only where the tokenizer would add it and the template did not."""
        roles = self.roles
        if roles.tokenizer_adds_bos and not roles.template_writes_bos and (not ids or ids[0] != roles.bos_id):
            return [roles.bos_id, *ids]  # type: ignore[list-item]
        return ids

    # -- 3. locate and label --------------------------------------------------------------
    def _normalised_answer(self, answer: str) -> str:
        cached = self._answer_norm.get(answer)
        if cached is None:
            tok = self.tokenizer
            ids = tok(answer, add_special_tokens=False)["input_ids"]
            cached = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()
            if len(self._answer_norm) >= 4096:  # a bounded memo: answers repeat in batches, not across a dataset
                self._answer_norm.clear()
            self._answer_norm[answer] = cached
        return cached

    def _matches(self, span: list[int], answer: str) -> bool:
        decoded = self.tokenizer.decode(span, skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()
        return decoded == answer.strip() or decoded == self._normalised_answer(answer)

    def _matches_with_reasoning(self, span: list[int], answer: str, reasoning: str) -> bool:
        """The span is the template's think block around ``reasoning``, then ``answer``.
        Whitespace is not compared: templates reshape it around the think tags."""
        decoded = "".join(self.tokenizer.decode(span, skip_special_tokens=False, clean_up_tokenization_spaces=False).split())
        want_answer, want_reasoning = "".join(answer.split()), "".join(reasoning.split())
        return decoded.endswith(want_answer) and want_reasoning in decoded[: len(decoded) - len(want_answer)]

    def _header_positions(self, ids: list[int]) -> list[int]:
        header, out, i = self.roles.assistant_header, [], _find(ids, self.roles.assistant_header, 0)
        while i >= 0:
            out.append(i)
            i = _find(ids, header, i + len(header))
        if out and self.roles.trailing_header and out[-1] == len(ids) - len(header):
            out.pop()  # the empty header the template writes after the last turn
        return out

    def _text_regions(self, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int, int]] | None:
        """(start, end, message index) of each text part of ``messages`` in their render ``text``,
        or None where it cannot be told.

        The messages are rendered a second time with a unique sentinel in place of each text, so
        the template's own text between them is known; the real render must then be exactly that
        template text with each sentinel replaced by its text as written (or stripped, as some
        templates do). Searching for the texts instead would be fooled by a user message found
        inside the template's boilerplate, or an answer quoted inside the user's message."""
        texts: list[tuple[str, str, int]] = []  # (sentinel, text, message index)

        def mark(t: str, k: int) -> str:
            sentinel = f"CTQZX{len(texts)}XZQTC"
            texts.append((sentinel, t, k))
            return sentinel

        marked_messages = []
        for k, m in enumerate(messages):
            c = m["content"]
            if isinstance(c, str):
                c = mark(c, k) if c else c
            else:
                c = [{**p, "text": mark(p["text"], k)} if p["type"] == "text" and p["text"] else p for p in c]
            marked_messages.append({**m, "content": c})
            field_name = self.roles.reasoning_field
            if field_name and isinstance(m.get(field_name), str) and m[field_name]:
                marked_messages[-1][field_name] = mark(m[field_name], k)
        try:
            marked = self._apply_template(marked_messages)
        except Exception:  # noqa: BLE001
            return None
        found = []
        for sentinel, t, k in texts:
            n = marked.count(sentinel)
            if n > 1 or sentinel in text:
                return None
            if n == 1:  # (a text the template does not write has no region)
                found.append((marked.index(sentinel), sentinel, t, k))
        found.sort()
        pieces, cursor = [], 0  # template text before each sentinel, and after the last
        for at, sentinel, _, _ in found:
            pieces.append(marked[cursor:at])
            cursor = at + len(sentinel)
        pieces.append(marked[cursor:])
        if not text.startswith(pieces[0]):
            return None
        # depth-first over the ways each text may be written (as is, or stripped)
        stack: list[tuple[int, int, tuple[tuple[int, int, int], ...]]] = [(0, len(pieces[0]), ())]
        budget = 64 + 8 * len(found)
        while stack and budget:
            budget -= 1
            n, at, regions = stack.pop()
            if n == len(found):
                if at == len(text):
                    return list(regions)
                continue
            t, k = found[n][2], found[n][3]
            forms = list(dict.fromkeys((t, t.strip(), t.lstrip(), t.rstrip(), t.strip("\n"))))
            for form in reversed(forms):  # the text as written is tried first
                end = at + len(form)
                if text.startswith(form, at) and text.startswith(pieces[n + 1], end):
                    stack.append((n + 1, end + len(pieces[n + 1]), (*regions, (at, end, k))))
        return None

    def _turn_structure(
        self, messages: list[dict[str, Any]], text: str, n_found: int,
    ) -> tuple[list[int | None], set[int]]:
        """Where each answer's header is among the ``n_found`` header occurrences of the final
        ids, and which occurrences were typed inside a message's text, read off the rendered
        conversation tokenized with offsets (so a role string tokenizes exactly as in context).
        ``([], set())`` where it cannot be told: every header is then tried in order."""
        regions = self._text_regions(messages, text)
        if regions is None:
            return [], set()
        header = self.roles.assistant_header
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        found = self._header_positions(list(enc["input_ids"]))
        if len(found) != n_found:  # media expansion changed what surrounds a header: do not guess
            return [], set()
        offsets = enc["offset_mapping"]
        chars = [(offsets[h][0], offsets[h + len(header) - 1][1]) for h in found]
        typed = {j for j, (hs, he) in enumerate(chars) if any(hs < re and he > rs for rs, re, _ in regions)}
        expected: list[int | None] = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            own = [rs for rs, _, i in regions if i == k]
            if not own:
                expected.append(None)
                continue
            start = min(own)
            before = max((re for _, re, i in regions if i < k and re <= start), default=0)
            structural = [j for j, (hs, he) in enumerate(chars) if j not in typed and hs >= before and he <= start]
            expected.append(structural[-1] if structural else None)
        return expected, typed

    def assistant_spans(
        self, ids: list[int], answers: list[Answer], sample: Sample,
        messages: list[dict[str, Any]] | None = None, text: str | None = None, view: TextView | None = None,
    ) -> list[tuple[int, int]]:
        """[start, end) of each answer plus its end-of-turn tokens, in order. ``messages`` and
        ``text`` are the normalised messages and their render (computed again when not given)."""
        header = self.roles.assistant_header
        if not header:
            return self._headerless_spans(ids, answers, sample, view)
        # More headers than answers: some were typed inside messages (a user quoting a whole
        # turn, even with the same answer). The rendered conversation tells which occurrence is
        # each answer's own and which were typed; those are never taken.
        # (ids.count is a cheap bound that skips all of this in ordinary samples.)
        positions: list[int] = []
        if ids.count(header[0]) > len(answers):
            positions = self._header_positions(ids)
        expected: list[int | None] = []
        typed: set[int] = set()
        if len(positions) > len(answers):
            if messages is None or text is None:
                messages = self.normalise(sample)
                text = self._render(messages, sample)
            expected, typed = self._turn_structure(messages, text, len(positions))
        spans: list[tuple[int, int]] = []
        pos = 0
        for turn, answer in enumerate(answers):
            guess = expected[turn] if turn < len(expected) else None
            span = None
            if answer.reasoning and self.roles.reasoning_header:
                span = self._reasoning_span(ids, pos, answer)
            if span is None and guess is not None and positions[guess] >= pos:
                span = self._span_after(ids, positions[guess] + len(header), answer, view)
            if span is None and positions:
                for j, h in enumerate(positions):
                    if h >= pos and j not in typed:
                        span = self._span_after(ids, h + len(header), answer, view)
                        if span is not None:
                            break
            elif span is None:
                h = _find(ids, header, pos)
                while h >= 0 and span is None:
                    span = self._span_after(ids, h + len(header), answer, view)
                    h = _find(ids, header, h + 1)  # no such span: a header typed inside a message
            if span is None:
                span = self._merged_header_span(ids, pos, answer)
            if span is None:
                span = self._span_after_inserted(ids, pos, answer, typed, positions)
            if span is None:
                raise SampleError(
                    sample.id, f"assistant turn {turn}", "label_contract",
                    f"no assistant header {self.tokenizer.decode(header)!r} whose span decodes to the answer "
                    f"{answer.text[:60]!r}", sample.source,
                )
            if not (answer.reasoning and self.roles.reasoning_header):
                span = (self._with_lead(ids, span[0]), *span[1:])
            spans.append(span[:2])
            answer.reasoning_rendered = span[2]
            pos = span[1]
            # the next header may begin with this answer's own end (ChatML's <|im_end|>): an
            # answer that follows an answer (two assistant messages in a row) is found too
            shared = self.roles.closing_before(ids, pos)
            if shared and tuple(ids[pos - shared : pos]) == header[:shared]:
                pos -= shared
        return spans

    def _with_lead(self, ids: list[int], start: int) -> int:
        """``start`` moved back over the header's last ids that the model writes after the
        generation prompt (``RoleTokens.answer_lead``); over all but the last of them where that
        one merged with the answer's first characters."""
        lead = self.roles.answer_lead
        if not lead:
            return start
        written = self.roles.assistant_header[-lead:]
        for k in (lead, lead - 1):
            if k and tuple(ids[start - k : start]) == written[:k]:
                return start - k
        return start

    def _span_after(self, ids: list[int], start: int, answer: Answer,
                    view: TextView | None = None) -> tuple[int, int, bool] | None:
        """The span of ``answer`` right after a header ending at ``start``: (start, end, whether
        its reasoning is in it). What the template inserts before a last answer only (an empty
        think block) is skipped, so it is masked like the header."""
        inserted = self.roles.inserted_before_last
        if answer.reasoning and not self.roles.reasoning_header:
            span = self._span_from(ids, start, answer.text, answer.reasoning)
            if span is not None:
                return (*span, True)
        if inserted and tuple(ids[start : start + len(inserted)]) == inserted:
            span = self._span_from(ids, start + len(inserted), answer.text, view=view)
            if span is not None:
                return (*span, False)
        span = self._span_from(ids, start, answer.text, view=view)
        return (*span, False) if span is not None else None

    def _span_after_inserted(self, ids: list[int], pos: int, answer: Answer, typed: set[int],
                             positions: list[int]) -> tuple[int, int, bool] | None:
        """An answer the template writes something before that the probes did not show (SmolLM3
        writes ``<think>\n\n</think>\n`` before every answer under a ``/no_think`` system prompt,
        a mode read off the message text): the span starts at the first token after a header from
        which it is exactly the answer, up to the turn's end of turn; what the template wrote
        between is masked like the header."""
        header = self.roles.assistant_header
        heads = [h for j, h in enumerate(positions) if h >= pos and j not in typed] if positions else []
        if not positions:
            h = _find(ids, header, pos)
            while h >= 0:
                heads.append(h)
                h = _find(ids, header, h + 1)
        for h in heads:
            start = h + len(header)
            close = _first_of(ids, self.roles.closings, start)
            if close is None:
                continue
            found = None
            for at in range(start + 1, close[0] + 1):
                span = self._span_from(ids, at, answer.text)
                if span is None or span[1] != close[0] + close[1]:
                    continue
                # whitespace the template wrote before the answer decodes like the answer's own
                # once stripped: the start whose text is the answer as written wins
                exact = self.tokenizer.decode(ids[at : close[0]], skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False) == answer.text
                if exact:
                    return (*span, False)
                found = found or (*span, False)
            if found is not None:
                return found
        return None

    def _reasoning_span(self, ids: list[int], pos: int, answer: Answer) -> tuple[int, int, bool] | None:
        """The span of an answer whose reasoning the template writes under a header of its own
        (harmony's analysis channel): from after that header, through the answer's header, to
        the answer's end of turn. Only a reasoning header before the next answer header counts
        (else the template dropped this turn's reasoning, and a later turn's is not this one's)."""
        rheader = self.roles.reasoning_header
        at = _find(ids, rheader, pos)
        if at < 0:
            return None
        nxt = _find(ids, self.roles.assistant_header, pos)
        if 0 <= nxt < at:
            return None
        span = self._span_from(ids, at + len(rheader), answer.text, answer.reasoning)
        return (*span, True) if span is not None else None

    def _merged_header_span(self, ids: list[int], pos: int, answer: Answer) -> tuple[int, int, bool] | None:
        """A header whose last token merged with the answer's first character into one token
        (ChatML ``assistant\n`` + ``\nCode`` gives ``\n\n``; mistral ``[/INST]`` + ``[x`` gives
        ``][``): the span starts at the merged token, which the model must emit."""
        header = self.roles.assistant_header
        if len(header) < 2:
            return None
        head, last = header[:-1], self.tokenizer.decode(header[-1:])
        h = _find(ids, head, pos)
        while h >= 0:
            at = h + len(head)
            if at < len(ids) and ids[at] != header[-1]:
                merged = self.tokenizer.decode(ids[at : at + 1])
                if merged.startswith(last) and len(merged) > len(last):
                    # the span's text is the header's last piece, then the answer
                    span = self._span_from(ids, at, last + answer.text, answer.reasoning or None)
                    if span is not None:
                        return (*span, bool(answer.reasoning))
            h = _find(ids, head, h + 1)
        return None

    def _headerless_spans(self, ids: list[int], answers: list[Answer], sample: Sample,
                          view: TextView | None = None) -> list[tuple[int, int]]:
        """The plain template has no roles: each caption starts right after the media tokens
        (and bos) that precede it, and ends with its eos."""
        skip = set(self.media_token_ids)
        if self.roles.bos_id is not None:
            skip.add(self.roles.bos_id)
        spans: list[tuple[int, int]] = []
        pos = 0
        for turn, answer in enumerate(answers):
            start = pos
            while start < len(ids) and ids[start] in skip:
                start += 1
            span = self._span_from(ids, start, answer.text, view=view)
            if span is None:
                raise SampleError(
                    sample.id, f"assistant turn {turn}", "label_contract",
                    f"no caption decoding to the answer {answer.text[:60]!r} after the media (plain template)",
                    sample.source,
                )
            spans.append(span)
            pos = span[1]
        return spans

    def _span_from(
        self, ids: list[int], start: int, answer: str, reasoning: str | None = None,
        view: TextView | None = None,
    ) -> tuple[int, int] | None:
        """The span from ``start`` to the first end of turn (of any form the template writes)
        before which the text is the answer.

        Where the end of turn starts with text before its special token (deepseek's
        ``\n<|EOT|>``) and the answer's last characters merged with that text, the special
        token alone closes the span. ``view``: the render under the tokens, checked first (the
        characters the span covers are the answer's), decoding only where they are not."""
        def matches(e: int) -> bool:
            if reasoning:
                return self._matches_with_reasoning(ids[start:e], answer, reasoning)
            if view is not None and (chars := view.chars(start, e)) is not None and chars.strip() == answer.strip():
                return True
            return self._matches(ids[start:e], answer)

        for closings in self._closing_tiers:
            hit = _first_of(ids, closings, start)
            while hit is not None and not matches(hit[0]):
                hit = _first_of(ids, closings, hit[0] + 1)
            if hit is not None:
                return start, hit[0] + hit[1]
        return None

    def encode(self, sample: Sample, media: Media | None = None) -> Encoded:
        typed = self.control.count(sample.messages)
        messages = self.normalise(sample, media, typed=typed)
        text = self._render(messages, sample)
        ids, tensors = self.handler.tokenize(text, sample, media, sanitize=self._sanitize(sample, typed))
        encoded = self.label(sample, self._with_bos(ids), tensors, messages=messages, text=text)
        encoded.typed_control_tokens = typed
        return encoded

    def encode_batch(self, samples: list[Sample]) -> list[Encoded | SampleError]:
        """Text-only samples in one tokenizer call (the collator's hot path); a failed sample
        gives its :class:`SampleError` in place, so one bad sample does not sink the batch.
        A sample with typed control tokens is tokenized on its own, marked."""
        results: list[Encoded | SampleError | None] = [None] * len(samples)
        texts: dict[int, str] = {}
        normalised: dict[int, list[dict[str, Any]]] = {}
        typed = [self.control.count(s.messages) for s in samples]
        for i, sample in enumerate(samples):
            try:
                normalised[i] = self.normalise(sample, typed=typed[i])
            except SampleError as exc:
                results[i] = exc
        try:  # one template call for the batch; on failure, per sample to name the culprit
            rendered = self._apply_template(list(normalised.values()))
            texts = dict(zip(normalised, rendered, strict=True))
        except Exception:  # noqa: BLE001
            for i in normalised:
                try:
                    texts[i] = self._render(normalised[i], samples[i])
                except SampleError as exc:
                    results[i] = exc
        for i in list(texts):  # no media here: a sample with media placeholders is an error
            try:
                self.handler.check_media(texts[i], samples[i], None)
            except SampleError as exc:
                results[i] = exc
                del texts[i]
        marked = {i for i in texts if self._sanitize(samples[i], typed[i])}
        plain = [i for i in texts if i not in marked]
        ids_of: dict[int, list[int]] = {}
        views: dict[int, TextView] = {}
        if plain:
            batch_ids, batch_offsets = self.handler.tokenize_batch_with_offsets([texts[i] for i in plain])
            for n, i in enumerate(plain):
                ids_of[i] = batch_ids[n]
                if batch_offsets is not None:
                    views[i] = TextView(texts[i], batch_offsets[n])
        for i in marked:
            ids_of[i] = self.handler.tokenize_batch([texts[i]], sanitize=True)[0]
        for i in texts:
            ids = self._with_bos(ids_of[i])
            view = views.get(i)
            if view is not None:
                view.shift = len(ids) - len(ids_of[i])
            try:
                encoded = self.label(samples[i], ids, {}, messages=normalised[i], text=texts[i], view=view)
            except SampleError as exc:
                results[i] = exc
                continue
            encoded.typed_control_tokens = typed[i]
            results[i] = encoded
        return results  # type: ignore[return-value]

    def label(
        self, sample: Sample, ids: list[int], tensors: dict[str, Any], *,
        messages: list[dict[str, Any]] | None = None, text: str | None = None, view: TextView | None = None,
    ) -> Encoded:
        """Labels for already-tokenized ``ids``: locate, verify, mask media, truncate.
        ``messages``/``text``: the normalised messages and their render, if already at hand;
        ``view``: that render under the tokens (offsets), when the ids are exactly its tokens."""
        answers = [Answer(message_text(m), m.get("reasoning_content") or "")
                   for m in sample.messages if m["role"] == "assistant"]
        spans = self.assistant_spans(ids, answers, sample, messages, text, view)
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in spans:
            labels[s:e] = ids[s:e]
        media = self.media_token_ids
        if media and not media.isdisjoint(ids):
            for i, tok in enumerate(ids):
                if tok in media:
                    labels[i] = IGNORE_INDEX
        truncated = 0
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels, tensors, truncated = self._truncate(ids, labels, tensors, sample)
        if labels.count(IGNORE_INDEX) == len(labels):
            raise SampleError(sample.id, "messages", "empty_labels",
                              "no answer token left to train" + (" after truncation" if truncated else ""), sample.source)
        dropped = sum(1 for a in answers if a.reasoning and not a.reasoning_rendered)
        return Encoded(sample.id, ids, labels, tensors, truncated, dropped_reasoning=dropped)

    def _truncate(
        self, ids: list[int], labels: list[int], tensors: dict[str, Any], sample: Sample,
    ) -> tuple[list[int], list[int], dict[str, Any], int]:
        """Cut text after the last media token only; a cut through media drops the sample.
        Per-token media tensors (Mllama's ``cross_attention_mask``, Qwen2-VL's
        ``mm_token_type_ids``) are cut with the ids."""
        keep = self.max_length
        assert keep is not None
        last_media = max((i for i, t in enumerate(ids) if t in self.media_token_ids), default=-1)
        if last_media >= keep:
            raise SampleError(
                sample.id, "messages", "too_long",
                f"{len(ids)} tokens > max length {keep}, and the cut would fall inside media tokens "
                f"(last media token at {last_media})", sample.source,
            )
        n = len(ids)
        tensors = {k: v[:, :keep] if is_per_token(v, n) else v for k, v in tensors.items()}
        return ids[:keep], labels[:keep], tensors, n - keep
