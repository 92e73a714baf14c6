"""Command-line options that ``demo`` and ``eval`` share, spelled and checked one way."""
from __future__ import annotations

from ..bundled import VERIFIERS
from ..search import STRATEGIES

DEFAULT_VERIFIER = "prm"
VERIFIER_HELP = ("what scores steps: 'prm' (the bundled trained PRM: policy-large trained further on the small "
                 "policy's own mistakes, read as a likelihood of each step's prefix; default) or 'likelihood' "
                 "(policy-large's likelihood untrained as a verifier: a larger model judging)")


def search_strategies() -> list[str]:
    """Every registered strategy but ``greedy`` (which the demo runs as its reference line)."""
    return [name for name in STRATEGIES if name != "greedy"]


def parse_budgets(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--budgets must be comma-separated positive ints, got {text!r}") from None
    if not out or out[0] < 1:
        raise SystemExit(f"--budgets must be comma-separated positive ints, got {text!r}")
    return out


def parse_strategies(text: str, allowed=None) -> list[str]:
    """``--strategies a,b,c``: registered names (or ``allowed``), in order, without repeats."""
    allowed = list(STRATEGIES) if allowed is None else list(allowed)
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [s for s in names if s not in allowed]
    if not names or bad:
        raise SystemExit(f"--strategies: unknown {bad or names}; choose from {', '.join(allowed)}")
    return names


def add_strategies_argument(ap, default: str, help_tail: str = "") -> None:
    ap.add_argument("--strategies", "--strategy", dest="strategies", default=default,
                    help=f"strategies to run, comma-separated, from {', '.join(STRATEGIES)} (default {default})"
                         + help_tail)


def add_verifier_argument(ap) -> None:
    ap.add_argument("--verifier", default=DEFAULT_VERIFIER, choices=VERIFIERS, help=VERIFIER_HELP)
