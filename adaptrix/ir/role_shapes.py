"""The shape of each role's weight, in the IR's canonical [out, in] layout, from a model's dimensions."""

from __future__ import annotations

from adaptrix.ir.values import Role, SourceModel

__all__ = ["NORM_ROLES", "role_shape"]

NORM_ROLES = frozenset({Role.ATTN_NORM, Role.MLP_NORM, Role.XATTN_NORM, Role.EMBED_NORM, Role.FINAL_NORM})


def role_shape(role: Role | str, source: SourceModel) -> tuple[int | None, int | None]:
    """(out, in) of the role's weight; None where the dimensions do not say; in = 0 for 1-D norms."""
    if not isinstance(role, Role):
        return (None, None)  # a module role: its module's shape says
    hidden, inter = source.hidden_size, source.intermediate_size
    shapes: dict[Role, tuple[int | None, int | None]] = {
        Role.ATTN_Q: (source.q_size, hidden),
        Role.ATTN_K: (source.kv_size, hidden),
        Role.ATTN_V: (source.kv_size, hidden),
        Role.ATTN_O: (hidden, source.q_size),
        # cross-attention: k and v read the encoder's output, whose width is hidden_size too (T5, BART)
        Role.XATTN_Q: (source.q_size, hidden),
        Role.XATTN_K: (source.kv_size, hidden),
        Role.XATTN_V: (source.kv_size, hidden),
        Role.XATTN_O: (hidden, source.q_size),
        Role.MLP_GATE: (inter, hidden),
        Role.MLP_UP: (inter, hidden),
        Role.MLP_DOWN: (hidden, inter),
        Role.EMBED: (source.vocab_size, hidden),
        Role.LM_HEAD: (source.vocab_size, hidden),
        Role.POOLER: (hidden, hidden),
        Role.CLS_DENSE: (hidden, hidden),
    }
    if role in NORM_ROLES:
        return (hidden, 0)
    return shapes.get(role, (None, hidden))  # position / type embeddings, classifier heads
