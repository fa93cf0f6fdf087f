"""QGuard's questions and its arithmetic, from the guard's answers to a risk: the guard questions
by group, P(yes) from next-token log-probabilities, the public code's question graph and its
PageRank-weighted score.

Data and pure functions on numbers, kept apart from the defense (harness/defenses/qguard.py) so the
score can be checked against references (by hand, an exact linear solve, networkx) without a model.

The graph, as the public code builds it: question -> its group (weight P(yes)), group -> group
(0.1), question -> later question of its group (0.3); PageRank (damping 0.85); risk = sum over
nodes of PageRank(n) times n's outgoing weight. P(yes) = softmax(logsumexp(yes variants),
logsumexp(no variants)).

Harness choices that make the score the same in every process:
  - group -> group edges run from the earlier to the later group name in sorted order: the public
    code takes the pairs from a Python set, so their direction, and the risk, changed with
    PYTHONHASHSEED. Question -> question edges follow the questions file, as in the public code.
  - PageRank is our own power iteration over sorted nodes and edges with networkx's conventions
    (uniform start and teleport; a node without outgoing weight spreads its rank uniformly; stop
    when the L1 change is below N * 1e-12, at most 1000 iterations).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import DataError

QUESTIONS_FILE = Path(__file__).with_name("data") / "qguard_questions.json"
PAGERANK_TOL = 1e-12  # per node: stop when the L1 change of the rank vector is below N * tol
PAGERANK_MAX_ITER = 1000


# ---- the questions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuardQuestions:
    """The guard questions by group, in file order, with where they came from and a digest of them."""

    groups: tuple[tuple[str, tuple[str, ...]], ...]
    source: str
    sha256: str

    @classmethod
    def load(cls, path: str | Path | None = None) -> GuardQuestions:
        """Our data file ({"source": ..., "groups": {...}}) or the public code's ({group: [question]})."""
        file = Path(path).expanduser() if path else QUESTIONS_FILE
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DataError(f"qguard questions file {file}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"qguard questions file {file} is not UTF-8 JSON: {exc}") from None
        table = data.get("groups", data) if isinstance(data, dict) else None
        if not isinstance(table, dict) or not table:
            raise DataError(f"qguard questions file {file}: expected an object of groups, each a list of questions")
        groups: list[tuple[str, tuple[str, ...]]] = []
        seen: set[str] = set()
        for name, questions in table.items():
            if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
                raise DataError(f"qguard questions file {file}: group {name!r} must be a non-empty list of questions")
            twice = sorted({q for q in questions if q in seen or questions.count(q) > 1})
            if twice:  # each question is one graph node, as in the public code
                raise DataError(f"qguard questions file {file}: question {twice[0]!r} appears twice")
            seen.update(questions)
            groups.append((str(name), tuple(questions)))
        digest = hashlib.sha256(json.dumps(groups, ensure_ascii=False).encode("utf-8")).hexdigest()
        return cls(tuple(groups), "bundled" if file == QUESTIONS_FILE else str(file), digest)

    def flat(self) -> list[tuple[str, str]]:
        """(group, question) in file order: the order of the guard requests and of P(yes) lists."""
        return [(g, q) for g, qs in self.groups for q in qs]


# ---- P(yes) ---------------------------------------------------------------------------------------
def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(v))), exact for -inf entries; NaN in, NaN out."""
    if any(math.isnan(v) for v in values):
        return math.nan
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def yes_probability(logprobs: Mapping[str, float], yes: Sequence[str], no: Sequence[str]) -> float:
    """softmax([logsumexp(yes), logsumexp(no)])[0]; NaN when a value is NaN (a failed request) or
    when neither side has any probability (an API guard that ranked no variant)."""
    y = logsumexp([logprobs.get(c, -math.inf) for c in yes])
    n = logsumexp([logprobs.get(c, -math.inf) for c in no])
    if math.isnan(y) or math.isnan(n) or y == n == -math.inf:
        return math.nan
    if y >= n:
        return 1.0 / (1.0 + math.exp(n - y))
    e = math.exp(y - n)
    return e / (1.0 + e)


# ---- the graph score ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Graph:
    """A weighted directed graph with sorted nodes and edges, so every sum runs in one order."""

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str, float], ...]

    def out_weight(self) -> dict[str, float]:
        out = {n: 0.0 for n in self.nodes}
        for src, _, w in self.edges:
            out[src] += w
        return out


def group_node(name: str) -> str:
    """Group and question nodes get distinct prefixes, so a question can never be taken for a group."""
    return f"group:{name}"


def question_graph(groups: Sequence[tuple[str, Sequence[tuple[str, float]]]], group_coupling: float = 0.1,
                   question_coupling: float = 0.3) -> Graph:
    """The public code's graph from (group, [(question, P(yes))]) in file order; group -> group edges
    go from the earlier to the later name in sorted order (see the module docstring)."""
    edges: dict[tuple[str, str], float] = {}
    for group, answered in groups:
        for question, p in answered:
            edges[(f"question:{question}", group_node(group))] = min(1.0, max(0.0, float(p)))
    names = sorted(g for g, _ in groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            edges[(group_node(a), group_node(b))] = group_coupling
    for _, answered in groups:
        for i, (a, _) in enumerate(answered):
            for b, _ in answered[i + 1:]:
                edges[(f"question:{a}", f"question:{b}")] = question_coupling
    nodes = sorted({n for pair in edges for n in pair} | {group_node(g) for g in names})
    return Graph(tuple(nodes), tuple(sorted((s, d, w) for (s, d), w in edges.items())))


def pagerank(graph: Graph, damping: float = 0.85, tol: float = PAGERANK_TOL,
             max_iter: int = PAGERANK_MAX_ITER) -> dict[str, float]:
    """Weighted PageRank by power iteration with networkx's conventions (see the module docstring)."""
    n = len(graph.nodes)
    if n == 0:
        return {}
    index = {node: i for i, node in enumerate(graph.nodes)}
    out = graph.out_weight()
    links = [(index[s], index[d], w / out[s]) for s, d, w in graph.edges if out[s] > 0]
    dangling = [index[node] for node in graph.nodes if out[node] <= 0]
    x = [1.0 / n] * n
    for _ in range(max_iter):
        spread = damping * sum(x[i] for i in dangling) / n + (1.0 - damping) / n
        new = [spread] * n
        for s, d, w in links:
            new[d] += damping * x[s] * w
        change = sum(abs(a - b) for a, b in zip(new, x))
        x = new
        if change < n * tol:
            return dict(zip(graph.nodes, x))
    raise RuntimeError(f"qguard PageRank did not converge in {max_iter} iterations")


def risk_score(graph: Graph, damping: float = 0.85) -> tuple[float, dict[str, float]]:
    """(sum over nodes of PageRank(n) times n's outgoing weight, the PageRank)."""
    ranks = pagerank(graph, damping)
    out = graph.out_weight()
    return sum(ranks[n] * out[n] for n in graph.nodes), ranks
