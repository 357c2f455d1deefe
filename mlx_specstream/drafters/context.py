"""Context drafts (prompt lookup): tokens copied from what is already in the context. They are
not a drafter of their own but a chain that joins any drafter's tree (a column of the candidate
matrix, see :class:`mlx_specstream.plan.TreePlan`), verified in the same forward pass."""

from __future__ import annotations

from typing import List, Sequence

MAX_RUN = 32  # tokens a match's run length is measured to


class ContextDrafts:
    """Drafts copied from the context (prompt lookup): the ``n`` tokens that followed the most
    recent earlier occurrence of the current suffix, longest match of ``max_ngram``..1 tokens. A
    continuation that runs into the present repeats itself (a loop of period < n). Host side,
    O(max_ngram) per token: every n-gram maps to where its latest continuation starts.

    Example: history ``a b c a b`` → suffix ``a b`` last continued at ``c`` → ``c a b c ...``.
    """

    def __init__(self, tokens: Sequence[int], n: int, max_ngram: int = 3, max_run: int = MAX_RUN):
        self.n, self.max_ngram, self.max_run = n, max_ngram, max_run
        # How long the present suffix runs equal to the text before the copied continuation (up to
        # ``max_run``; 0: no match): the longer, the likelier the copy goes on (a code edit
        # copying a function line by line), a far better sign than the n-gram length alone.
        self.match = 0
        self.hist: List[int] = []
        self.next_at: List[dict] = [{} for _ in range(max_ngram + 1)]
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        h = self.hist
        for t in tokens:
            i = len(h)
            for m in range(1, min(self.max_ngram, i) + 1):
                self.next_at[m][tuple(h[i - m : i])] = i
            h.append(int(t))

    def propose(self) -> List[int]:
        h = self.hist
        self.match = 0
        for m in range(min(self.max_ngram, len(h)), 0, -1):
            pos = self.next_at[m].get(tuple(h[-m:]))
            if pos is not None:
                run = m
                while run < self.max_run and pos - run - 1 >= 0 and h[pos - run - 1] == h[-run - 1]:
                    run += 1
                self.match = run
                out: List[int] = []
                for j in range(self.n):
                    i = pos + j
                    out.append(h[i] if i < len(h) else out[i - len(h)])
                return out
        return []
