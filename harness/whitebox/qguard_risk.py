"""QGuard's risk as a differentiable function of its questions' P(yes), for an adaptive attack.

QGuard (harness/defenses/qguard.py) scores an input by PageRank over a graph whose question ->
group edges weigh P(yes); risk = sum over nodes of PageRank(n) times n's outgoing weight
(harness/defenses/qguard_graph.py). Every step of that is smooth in P(yes) except where an
outgoing weight is exactly 0, so the risk can be differentiated: the graph is the defense's own
(`question_graph`, built once with placeholder answers to learn its nodes and edges), and the
PageRank fixed point, which the defense reaches by power iteration to 1e-12, is solved exactly here
as one linear system (networkx's conventions: uniform teleport, a node without outgoing weight
spreads its rank uniformly), batched over inputs. A test checks it against the defense's score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.defenses.qguard_graph import question_graph


class TorchRisk:
    """risk(p_yes [R, Q]) -> [R] for questions given as (group, [question]) in file order."""

    def __init__(self, groups: Sequence[tuple[str, Sequence[str]]], group_coupling: float,
                 question_coupling: float, damping: float) -> None:
        placeholder = [(g, [(q, 0.5) for q in qs]) for g, qs in groups]
        graph = question_graph(placeholder, group_coupling, question_coupling)
        self.nodes = graph.nodes
        index = {node: i for i, node in enumerate(graph.nodes)}
        questions = [q for _, qs in groups for q in qs]
        answered = {(f"question:{q}", f"group:{g}"): j for j, (g, q) in enumerate((g, q) for g, qs in groups for q in qs)}
        n = len(graph.nodes)
        self.constant = torch.zeros(n, n, dtype=torch.float64)  # every edge that is not a P(yes)
        src, dst, col = [], [], []
        for s, d, w in graph.edges:
            if (s, d) in answered:
                src.append(index[s])
                dst.append(index[d])
                col.append(answered[(s, d)])
            else:
                self.constant[index[s], index[d]] = w
        if len(col) != len(questions):
            raise ValueError("qguard graph: every question needs exactly one edge to its group")
        self.src, self.dst, self.col = (torch.tensor(v, dtype=torch.long) for v in (src, dst, col))
        self.damping = damping

    def __call__(self, p_yes: torch.Tensor) -> torch.Tensor:
        rows, n = p_yes.shape[0], len(self.nodes)
        dtype, device = torch.float64, p_yes.device
        weights = self.constant.to(device).expand(rows, n, n).clone()
        weights[:, self.src.to(device), self.dst.to(device)] = p_yes.to(dtype)[:, self.col.to(device)].clamp(0.0, 1.0)
        out = weights.sum(-1)  # [R, N] outgoing weight
        dangling = (out <= 0).to(dtype)
        transition = weights / torch.where(out > 0, out, torch.ones_like(out))[..., None]  # rows sum to 1 (or 0)
        d = self.damping
        # x = d * T^T x + (d * dangling.x + 1 - d) / n  ->  (I - d T^T - d/n 1 dangling^T) x = (1 - d)/n 1
        eye = torch.eye(n, dtype=dtype, device=device).expand(rows, n, n)
        system = eye - d * transition.transpose(1, 2) - (d / n) * dangling[:, None, :].expand(rows, n, n)
        rank = torch.linalg.solve(system, torch.full((rows, n, 1), (1 - d) / n, dtype=dtype, device=device))[..., 0]
        return (rank * out).sum(-1)
