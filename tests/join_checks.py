"""The test side of continuous batching: requests offered to a running search at its looks."""


class Offers:
    """A ``join`` for the continuous searches (``run_continuous``, ``serve_sampling``, ...): request ``i > 0`` of
    ``reqs`` (``(prompts, seeds)`` pairs, tagged ``i``) is offered from look ``joins_at[i - 1]`` on, in order (a
    request is offered once those before it have joined), until one does not fit. ``looks``: the looks seen."""

    def __init__(self, reqs, joins_at):
        self.reqs, self.joins_at = reqs, joins_at
        self.looks = 0
        self.taken: set[int] = set()

    def __call__(self, fit):
        self.looks += 1
        out = []
        for i in range(1, len(self.reqs)):
            if i in self.taken:
                continue
            if self.joins_at[i - 1] > self.looks:
                break
            g = fit(self.reqs[i][0], self.reqs[i][1], i)
            if g is None:
                break
            self.taken.add(i)
            out.append(g)
        return out


def served(launch, reqs, joins_at, *, held=lambda: 0, on_start=None):
    """``launch(join, deliver, started)`` runs a continuous search whose first request is ``reqs[0]``; request
    ``i > 0`` is offered from look ``joins_at[i - 1]`` on (:class:`Offers`). Every request must get a result (not
    an exception). Returns ``{request: result}``, ``{request: the look it started at}``, ``held()`` (the KV blocks
    held) at each answer, in order, and the looks seen. ``on_start(group)``: called as each group starts."""
    got, began, blocks = {}, {}, []
    join = Offers(reqs, joins_at)

    def started(g):
        began[g.tag] = join.looks
        if on_start is not None:
            on_start(g)

    def deliver(g, res):
        assert not isinstance(res, Exception), res
        got[g.tag] = res
        blocks.append(held())

    launch(join, deliver, started)
    return got, began, blocks, join.looks
