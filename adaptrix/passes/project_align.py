"""Coordinate alignment of two models from their weights, for `project:method=svd,source=SRC`.

Residual stream. Token v enters the source as the row E_s[v] and the target as E_t[v]; a linear
change of coordinates x_t = T x_s should make E_t ~ E_s T^T. The output rows say the same from the
other side: logits are R x / rms(x) with R = W_lm_head diag(g_final), so R_t T ~ c R_s, where
c = rms_t / rms_s is the ratio of the residual scales (measured on the embeddings). T minimises

    |E_s T^T - E_t|^2 / |E_t|^2 + |R_t T - c R_s|^2 / |c R_s|^2 + mu |T - T_0|^2

(T_0: the truncation map, mu = 1e-7 of the first term's mean curvature: a weak prior that only
decides the directions the vocabulary leaves open). Setting the gradient to zero gives the
Sylvester equation (w_r R_t^T R_t + mu I) T + T (w_e E_s^T E_s) = C, solved exactly through the
eigendecompositions of the two symmetric matrices. G = T^+ (ridge pseudo-inverse) reads source
coordinates back: x_s ~ G x_t. A module after an RMSNorm reads u = g * x / rms(x), so its input
side uses P_u = diag(g_t) T diag(1/g_s) / c and Q_u = c diag(g_s) G diag(1/g_t).

Attention heads, per layer. A target weight expressed in source input coordinates is W_t P_u.
Source and target heads are compared by how much of one head's weight lies in the other's
subspace: rows of W_k and W_v for kv heads, rows of W_q and columns of G W_o for query heads.
kv heads are matched first (greedy on the summed overlap), then the query heads inside each matched
group, so GQA groups stay together. Within a matched head, D = (W_t P_u)_h' (W_s)_h^+ is the
least-squares map of head coordinates; a q / k / v delta goes through D, the o_proj input side
through D_v^+ (attention outputs are mixtures of values).

MLP neurons, per layer: the neuron basis is privileged (the activation is elementwise), so neurons
are matched one to one (greedy) by cos(gate_i, gate_j) + cos(up_i, up_j) * cos(down_i, down_j)
(the product is invariant to the joint sign flip of up and down that leaves the function unchanged),
with least-squares scales (a_gate, a_up on the output side of gate / up, b for down's input side
from T down_s,i ~ down_t,j / b).

On a function-preserving grown model (old coordinates first, new ones unused) every equation above
holds exactly at the truncation maps, so they are the solution: the transfer is exact. With the
adapter's own base, every map is the identity.
"""

from __future__ import annotations

import math

import torch

from adaptrix.ir.errors import BadInputError
from adaptrix.ir.values import Role, Site, SourceModel
from adaptrix.passes.project_maps import BlockMap, DenseMap, IndexMap, truncation

__all__ = ["Alignment", "greedy_pairs", "safe_reciprocal"]

_TINY = 1e-12


def safe_reciprocal(values: torch.Tensor) -> torch.Tensor:
    """1 / values, with 0 where a value is (nearly) zero."""
    limit = _TINY * max(float(values.abs().max()), _TINY)
    return torch.where(values.abs() > limit, 1 / values, torch.zeros_like(values))


def greedy_pairs(score: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (row, column) taken in order of decreasing score, each row and column at most once."""
    rows, cols = score.shape
    order = torch.argsort(score.reshape(-1), descending=True)
    used_rows, used_cols, pairs = set(), set(), []
    for flat in order.tolist():
        i, j = divmod(flat, cols)
        if i not in used_rows and j not in used_cols:
            pairs.append((i, j))
            used_rows.add(i)
            used_cols.add(j)
            if len(pairs) == min(rows, cols):
                break
    return sorted(pairs)


def _overlap(source: torch.Tensor, target: torch.Tensor) -> float:
    """Share of target's rows (squared norm) inside the row space of source."""
    basis, _ = torch.linalg.qr(source.T)
    total = float(target.square().sum())
    return float((target @ basis).square().sum()) / total if total > 0 else 0.0


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    return matrix * safe_reciprocal(matrix.norm(dim=1))[:, None]


class Alignment:
    """The maps between a source model's coordinates and a target's, from both models' weights."""

    def __init__(self, read_source, read_target, source: SourceModel, target: SourceModel):
        self.read_s, self.read_t = read_source, read_target
        self.source, self.target = source, target
        self.T, self.G, self.c = self._residual()
        self.residual = DenseMap(self.T, self.G)
        self._layers: dict[int, dict[str, object]] = {}
        self._norms: dict[Site, DenseMap] = {}

    def _residual(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        e_s, e_t = self.read_s(Site(None, Role.EMBED)), self.read_t(Site(None, Role.EMBED))
        if e_s is None or e_t is None or e_s.shape[0] != e_t.shape[0]:
            raise BadInputError(
                "aligning the two models needs token embeddings in both, over the same vocabulary",
                fix="use method=svd without source=, or method=truncate",
            )
        d_s, d_t = e_s.shape[1], e_t.shape[1]
        c = float(e_t.norm() / math.sqrt(d_t)) / max(float(e_s.norm() / math.sqrt(d_s)), _TINY)
        w_e = 1 / max(float(e_t.square().sum()), _TINY)
        prior = truncation(d_s, d_t).push(torch.eye(d_s, dtype=torch.float64))
        curvature = w_e * e_s.T @ e_s
        mu = 1e-7 * max(float(torch.trace(curvature)) / d_s, _TINY)
        lhs, rhs = mu * torch.eye(d_t, dtype=torch.float64), w_e * e_t.T @ e_s + mu * prior
        r_s, r_t = self._readout(self.read_s), self._readout(self.read_t)
        if r_s is not None and r_t is not None:
            w_r = 1 / max(c * c * float(r_s.square().sum()), _TINY)
            lhs = lhs + w_r * r_t.T @ r_t
            rhs = rhs + w_r * c * r_t.T @ r_s
        la, qa = torch.linalg.eigh(lhs)
        lb, qb = torch.linalg.eigh(curvature)
        t = qa @ ((qa.T @ rhs @ qb) / (la[:, None] + lb[None, :])) @ qb.T
        gram = t.T @ t
        eps = 1e-9 * max(float(torch.trace(gram)) / d_s, _TINY)
        g = torch.linalg.solve(gram + eps * torch.eye(d_s, dtype=torch.float64), t.T)
        return t, g, c

    @staticmethod
    def _readout(read) -> torch.Tensor | None:
        head, gain = read(Site(None, Role.LM_HEAD)), read(Site(None, Role.FINAL_NORM))
        if head is None:
            return None
        return head if gain is None else head * gain[None, :]

    def norm_map(self, norm: Site) -> DenseMap:
        """The map of the input of modules after the norm at `norm` (u = g * x / rms(x))."""
        if norm not in self._norms:
            g_s, g_t = self.read_s(norm), self.read_t(norm)
            if g_s is None or g_t is None:
                self._norms[norm] = self.residual
            else:
                push = g_t[:, None] * self.T * safe_reciprocal(g_s)[None, :] / max(self.c, _TINY)
                pull = self.c * (g_s[:, None] * self.G * safe_reciprocal(g_t)[None, :])
                self._norms[norm] = DenseMap(push, pull)
        return self._norms[norm]

    def layer(self, layer: int) -> dict[str, object]:
        """The head and neuron maps of one layer, by axis kind (q, k, v, z, gate, up, ff)."""
        if layer not in self._layers:
            maps = self._heads(layer)
            maps.update(self._neurons(layer))
            self._layers[layer] = maps
        return self._layers[layer]

    def _weights(self, layer: int, role: Role) -> tuple[torch.Tensor, torch.Tensor]:
        site = Site(layer, role)
        found = self.read_s(site), self.read_t(site)
        if found[0] is None or found[1] is None:
            raise BadInputError(
                f"layer {layer} has no {role} weight in the base or in the source",
                fix="carry the adapter with method=truncate, or run redistribute first",
            )
        return found

    def _heads(self, layer: int) -> dict[str, object]:
        s, t = self.source, self.target
        pin = self.norm_map(Site(layer, Role.ATTN_NORM)).push_matrix
        q_s, q_t = self._weights(layer, Role.ATTN_Q)
        k_s, k_t = self._weights(layer, Role.ATTN_K)
        v_s, v_t = self._weights(layer, Role.ATTN_V)
        o_s, o_t = self._weights(layer, Role.ATTN_O)
        q_t, k_t, v_t, o_t = q_t @ pin, k_t @ pin, v_t @ pin, self.G @ o_t
        hs, ht = s.head_dim, t.head_dim

        def block(w: torch.Tensor, i: int, size: int) -> torch.Tensor:
            return w[i * size : (i + 1) * size]

        kv_score = torch.tensor([[
            _overlap(block(k_s, a, hs), block(k_t, b, ht)) + _overlap(block(v_s, a, hs), block(v_t, b, ht))
            for b in range(t.num_kv_heads)] for a in range(s.num_kv_heads)], dtype=torch.float64)  # fmt: skip
        kv_pairs = greedy_pairs(kv_score)
        group_s, group_t = s.num_heads // s.num_kv_heads, t.num_heads // t.num_kv_heads
        q_pairs = []
        for a, b in kv_pairs:
            heads_s = range(a * group_s, (a + 1) * group_s)
            heads_t = range(b * group_t, (b + 1) * group_t)
            score = torch.tensor([[
                _overlap(block(q_s, i, hs), block(q_t, j, ht))
                + _overlap(block(o_s.T, i, hs), block(o_t.T, j, ht))
                for j in heads_t] for i in heads_s], dtype=torch.float64)  # fmt: skip
            q_pairs += [(heads_s[i], heads_t[j]) for i, j in greedy_pairs(score)]
        fits = {name: [self._fit(block(w_s, i, hs), block(w_t, j, ht)) for i, j in pairs]
                for name, w_s, w_t, pairs in (("q", q_s, q_t, q_pairs), ("k", k_s, k_t, kv_pairs),
                                              ("v", v_s, v_t, kv_pairs))}  # fmt: skip
        kv_of = dict(zip((a for a, _ in kv_pairs), fits["v"], strict=True))
        z_blocks = [kv_of[i // group_s] for i, _ in q_pairs]
        return {
            "q": _heads_map(q_pairs, fits["q"], s.num_heads, t.num_heads, hs, ht),
            "k": _heads_map(kv_pairs, fits["k"], s.num_kv_heads, t.num_kv_heads, hs, ht),
            "v": _heads_map(kv_pairs, fits["v"], s.num_kv_heads, t.num_kv_heads, hs, ht),
            "z": _heads_map(q_pairs, z_blocks, s.num_heads, t.num_heads, hs, ht),
        }

    @staticmethod
    def _fit(w_s: torch.Tensor, w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, D^+): the least-squares D with w_t ~ D w_s, and its pseudo-inverse."""
        push = torch.linalg.lstsq(w_s.T, w_t.T).solution.T
        return push, torch.linalg.pinv(push)

    def _neurons(self, layer: int) -> dict[str, object]:
        pin = self.norm_map(Site(layer, Role.MLP_NORM)).push_matrix
        gate_s, gate_t = self._weights(layer, Role.MLP_GATE)
        up_s, up_t = self._weights(layer, Role.MLP_UP)
        down_s, down_t = self._weights(layer, Role.MLP_DOWN)
        gate_t, up_t, down_back = gate_t @ pin, up_t @ pin, self.G @ down_t
        score = _unit_rows(gate_s) @ _unit_rows(gate_t).T + (_unit_rows(up_s) @ _unit_rows(up_t).T) * (
            _unit_rows(down_s.T) @ _unit_rows(down_back.T).T)  # fmt: skip
        pairs = greedy_pairs(score)
        src = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        dst = torch.tensor([j for _, j in pairs], dtype=torch.long)

        def scale(w_s: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
            a, b = w_s[src], w_t[dst]
            return (a * b).sum(1) * safe_reciprocal(a.square().sum(1))

        a_gate, a_up = scale(gate_s, gate_t), scale(up_s, up_t)
        b_down = scale((self.T @ down_s).T, down_t.T)
        size_s, size_t = gate_s.shape[0], gate_t.shape[0]
        return {
            "gate": IndexMap(size_s, size_t, src, dst, a_gate, safe_reciprocal(a_gate)),
            "up": IndexMap(size_s, size_t, src, dst, a_up, safe_reciprocal(a_up)),
            "ff": IndexMap(size_s, size_t, src, dst, safe_reciprocal(b_down), b_down),
        }


def _heads_map(pairs, blocks, heads_s: int, heads_t: int, hs: int, ht: int) -> BlockMap:
    built = []
    for (i, j), (push, pull) in zip(pairs, blocks, strict=True):
        built.append((torch.arange(i * hs, (i + 1) * hs), torch.arange(j * ht, (j + 1) * ht), push, pull))
    return BlockMap(heads_s * hs, heads_t * ht, tuple(built))
