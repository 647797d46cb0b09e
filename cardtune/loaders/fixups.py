"""Special-token fix-ups from the card (``chat.special_tokens``), applied to a loaded tokenizer.

Many tokenizers lack tokens that training code assumes (Qwen-VL-Chat has no bos, eos or pad)
or give several roles one token (phi-2: bos == eos == unk). The card names each token; here
it is assigned when the vocabulary has it and added otherwise, and the result is checked:
bos, eos and unk must be distinct unless the card allows sharing, because code that finds a
sequence's start or end by id cannot tell shared tokens apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cardtune.registry.errors import CardError
from cardtune.registry.schema import SpecialTokens

ROLES = ("pad", "unk", "bos", "eos")
DISTINCT_ROLES = ("bos", "eos", "unk")


@dataclass(frozen=True)
class FixupReport:
    """What the fix-ups did. ``added`` tokens are new to the vocabulary: the model's input
    (and output) embeddings must be resized to ``len(tokenizer)``."""

    tokens: dict[str, str | None]
    ids: dict[str, int | None]
    assigned: dict[str, str] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    shared: list[tuple[str, ...]] = field(default_factory=list)
    pad_is_eos: bool = False

    @property
    def needs_resize(self) -> bool:
        return bool(self.added)

    def lines(self) -> list[str]:
        """One human-readable line per fact, for logs and ``cardtune check``."""
        out = [
            "special tokens: "
            + ", ".join(
                f"{r} {self.tokens[r]!r} ({self.ids[r]})" if self.tokens[r] else f"{r} none" for r in ROLES
            )
        ]
        out += [f"{role} set to existing token {token!r} (card)" for role, token in self.assigned.items()]
        if self.added:
            out.append(f"added to the vocabulary: {', '.join(map(repr, self.added))}; resize the embeddings")
        out += [f"shared (card allows it): {' = '.join(group)}" for group in self.shared]
        if self.pad_is_eos:
            out.append(
                "pad == eos: padding must be found by the attention mask, never by id, or eos labels are lost"
            )
        if self.tokens["pad"] is None:
            out.append("no pad token: set chat.special_tokens.pad in the card")
        return out


def _shared_groups(tokens: dict[str, str | None]) -> list[tuple[str, ...]]:
    by_token: dict[str, list[str]] = {}
    for role in DISTINCT_ROLES:
        if tokens[role] is not None:
            by_token.setdefault(tokens[role], []).append(role)
    return [tuple(roles) for roles in by_token.values() if len(roles) > 1]


def apply_special_token_fixups(
    tokenizer: Any, spec: SpecialTokens, *, where: str = "chat.special_tokens"
) -> FixupReport:
    """Give ``tokenizer`` the card's pad/unk/bos/eos, then check bos, eos and unk are distinct.

    A token the vocabulary holds is assigned to its role; one it lacks is added as a special
    token (at id ``len(tokenizer) - 1`` when it is the last added). Raises :class:`CardError`
    (its message starts with ``where``) when bos, eos and unk are not distinct after the
    fix-ups and ``spec.allow_shared`` is false; absent tokens never collide.
    """
    from transformers import AddedToken

    assigned: dict[str, str] = {}
    added: list[str] = []
    vocab = set(tokenizer.get_vocab())
    for role in ROLES:
        token = getattr(spec, role)
        if token is None:
            continue
        if token in vocab:
            # Only the role changes: the token keeps its id and how it is matched in text.
            setattr(tokenizer, f"{role}_token", token)
            assigned[role] = token
        else:
            tokenizer.add_special_tokens({f"{role}_token": AddedToken(token, special=True, normalized=False)})
            added.append(token)
            vocab.add(token)

    tokens: dict[str, str | None] = {role: getattr(tokenizer, f"{role}_token") for role in ROLES}
    ids = {
        role: (tokenizer.convert_tokens_to_ids(t) if t is not None else None) for role, t in tokens.items()
    }
    shared = _shared_groups(tokens)
    if shared and not spec.allow_shared:
        clash = "; ".join(
            " = ".join(group) + f" = {tokens[group[0]]!r} (id {ids[group[0]]})" for group in shared
        )
        raise CardError(
            f"{where}: bos, eos and unk must be distinct tokens, but {clash}. "
            "Give distinct tokens in the card (a missing one is added), "
            "or set allow_shared: true if the model was trained with them shared"
        )
    pad_is_eos = tokens["pad"] is not None and tokens["pad"] == tokens["eos"]
    return FixupReport(tokens, ids, assigned, added, shared if spec.allow_shared else [], pad_is_eos)
