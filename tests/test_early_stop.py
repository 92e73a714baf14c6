"""The early-stopping strategies (search/early_stop.py) on the scripted fake and a tiny paged Llama:
each against a plain-Python reference of its rule built from majority's candidates (the same draws)."""
import math
import random
from collections import Counter

import pytest
import torch
from scripted import ScriptedPolicy, ScriptedVerifier
from tiny_models import char_tokenizer, tiny_llama

from tts_kernels.models.policy import HFPolicy
from tts_kernels.models.text import split_steps
from tts_kernels.search import Settings
from tts_kernels.search.best_of_n import sample_completions
from tts_kernels.search.early_stop import (adaptive_consistency, beta_settled, deepconf, deepconf_offline,
                                           lowest_group, quantile, speculative_rejection)
from tts_kernels.search.strategies import STRATEGIES, run

PROMPTS = ["abc", "h. a", "ggg", "b"]
SEEDS = [5, 17, 3, 11]


def first_char(text):  # the scripted vocabulary has no digits: a candidate's answer is its first letter
    t = text.strip()
    return t[0] if t and t[0].isalpha() else None


def settings(**kw):
    base = dict(temperature=1.0, max_new_tokens=24, sync_every=4, confidence_k=4, confidence_window=3)
    return Settings(**{**base, **kw})


def reference_confidence(policy, prompt, ids, k):
    """Per token of ``ids``: -mean(top-k log-probs) of the distribution it was drawn from (float64)."""
    pid = policy.encode(prompt)
    last, pos, out = pid[-1], len(pid), []
    for t in ids:
        lp = torch.log_softmax(policy.logits(torch.tensor([last]), torch.tensor([pos]))[0].double(), -1)
        out.append(-lp.topk(min(k, lp.shape[0])).values.mean().item())
        last, pos = t, pos + 1
    return out


def full_candidates(policy, prompts, n, s, seeds):
    """majority's candidates (token ids, EOS kept), drawn under the same keys."""
    _, ids, fins, _ = sample_completions(policy, prompts, n, max_new_tokens=s.max_new_tokens,
                                         temperature=s.temperature, seed=seeds, sync_every=s.sync_every)
    return ids, fins


# ----------------------------------------------------------------------------- rule helpers

def test_beta_rule_matches_numeric_integration():
    for a in range(0, 9):
        for b in range(0, a + 1):
            # P(X > 1/2), X ~ Beta(a + 1, b + 1), by the midpoint rule on a fine grid
            N = 20000
            xs = [(i + 0.5) / N for i in range(N)]
            dens = [x ** a * (1 - x) ** b for x in xs]
            p = sum(d for x, d in zip(xs, dens) if x > 0.5) / sum(dens)
            for c in (0.5, 0.8, 0.95):
                if abs(p - c) > 1e-3:
                    assert beta_settled(a, b, c) == (p > c), (a, b, c, p)


def test_lowest_group_and_quantile():
    rng = random.Random(0)
    for _ in range(50):
        xs = [rng.uniform(0, 5) for _ in range(rng.randint(1, 30))]
        w = rng.randint(1, 8)
        brute = min(sum(xs[i:i + w]) / w for i in range(len(xs) - w + 1)) if len(xs) > w else sum(xs) / len(xs)
        assert lowest_group(xs, w) == pytest.approx(brute, rel=1e-12)
        q = rng.random()
        assert quantile(xs, q) == pytest.approx(torch.quantile(torch.tensor(xs, dtype=torch.float64), q).item())


def test_a_tie_with_the_threshold_is_not_below_it():
    """A later candidate that repeats a warm-up one has the threshold's confidence; a batch's float rounding moves
    it by ~1e-7 either way, which must not abort it or take its vote: within TIE (1e-5) of the threshold is a tie."""
    from tts_kernels.search.early_stop import TIE, DeepConfOnline, Trace

    rule = DeepConfOnline(4, warmup=2, keep=0.5, consensus=1.0, window=2, extract=first_char, key=str, parallel=4)
    rule.grow([0])
    rule.thresholds[0] = 10.0
    assert rule.threshold(0) == pytest.approx(10.0 * (1 - TIE), rel=1e-12)
    for low, votes in ((10.0, True), (10.0 * (1 - 1e-6), True), (10.0 * (1 - 2e-5), False), (10.5, True)):
        t = Trace(0, 2, [5, 6], "eos", [low, low], text="a")
        assert rule.retained(0, t) is votes, low
    rule.thresholds[0] = -3.0  # (a negative threshold: the margin still lies below it)
    assert rule.threshold(0) < -3.0 and rule.retained(0, Trace(0, 2, [5], "eos", [-3.0 * (1 + 1e-6)], text="a"))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="deepconf_keep"):
        Settings(deepconf_keep=0.0)
    with pytest.raises(ValueError, match="stop_confidence"):
        Settings(stop_confidence=1.0)
    with pytest.raises(ValueError, match="confidence_window"):
        Settings(confidence_window=0)
    with pytest.raises(ValueError, match="rejection_rate"):
        Settings(rejection_rate=1.0)


def test_registered_and_run():
    for name in ("deepconf", "deepconf_offline", "adaptive_consistency", "speculative_rejection"):
        assert name in STRATEGIES
    pol = ScriptedPolicy(seed=1)
    res = run("deepconf", pol, None, PROMPTS[:2], budget=6, settings=settings(), seed=SEEDS[:2], extract=first_char)
    assert res.strategy == "deepconf" and len(res.predictions) == 2
    with pytest.raises(ValueError, match="verifier"):
        run("speculative_rejection", pol, None, PROMPTS[:2], budget=4, settings=settings())


# ----------------------------------------------------------------------------- deepconf offline

def test_deepconf_offline_is_majority_candidates_filtered_by_confidence():
    pol = ScriptedPolicy(seed=2)
    s = settings(deepconf_keep=0.5)
    n = 6
    res = deepconf_offline(pol, None, PROMPTS, n=n, settings=s, seed=SEEDS, extract=first_char)
    ids, fins = full_candidates(pol, PROMPTS, n, s, SEEDS)
    for p, prompt in enumerate(PROMPTS):
        cands = res.candidates[p]
        assert [c.token_ids for c in cands] == ids[p]
        assert [c.finish for c in cands] == fins[p]
        conf = []
        for c in cands:
            ref = reference_confidence(pol, prompt, c.token_ids, s.confidence_k)
            assert c.token_confidence == pytest.approx(ref, rel=1e-5, abs=1e-5)
            conf.append(lowest_group(ref, s.confidence_window))
            assert c.confidence["lowest_group"] == pytest.approx(conf[-1], rel=1e-5)
        # the rule: the most confident half votes, weighted by confidence
        kept = sorted(range(n), key=lambda i: (-conf[i], i))[: math.ceil(0.5 * n)]
        votes = Counter()
        for i in kept:
            a = first_char(cands[i].text)
            if a is not None:
                votes[a] += conf[i]
        want = max(votes, key=lambda a: (votes[a], -min(i for i in kept if first_char(cands[i].text) == a))) \
            if votes else None
        assert res.predictions[p] == want
        assert sorted(set(range(n)) - set(kept)) == res.prompt_info[p]["filtered"]
    assert res.compute.policy_generated_tokens == sum(len(c.token_ids) for row in res.candidates for c in row)


# ----------------------------------------------------------------------------- deepconf online

def deepconf_reference(policy, prompt, full_ids, full_fins, s, n):
    """The online rule in plain Python over the prompt's full candidates: (decided_at, threshold,
    [(ids, finish)] of candidates 0..k-1, prediction)."""
    W, warm = s.confidence_window, min(n, s.deepconf_warmup or max(2, n // 4))
    confs = [reference_confidence(policy, prompt, ids, s.confidence_k) for ids in full_ids]
    lows = [lowest_group(c, W) for c in confs[:warm]]
    thr = quantile(lows, 1 - s.deepconf_keep)
    traces = []
    for j in range(n):
        ids, fin, c = full_ids[j], full_fins[j], confs[j]
        if j >= warm:
            for i in range(W - 1, len(c)):
                if sum(c[i - W + 1:i + 1]) / W < thr and not (ids[i] == 1):  # EOS ends it first
                    ids, fin, c = ids[: i + 1], "aborted", c[: i + 1]
                    break
        traces.append((ids, fin, c))
    decided = None
    for k in range(warm, n + 1 if s.consensus < 1.0 else warm):  # consensus 1.0: never early
        kept = [t for t in traces[:k] if t[1] != "aborted" and lowest_group(t[2], W) >= thr]
        votes = Counter()
        for ids, _, c in kept:
            a = first_char(policy.tokenizer.decode([t for t in ids if t != 1], skip_special_tokens=True))
            if a is not None:
                votes[a] += lowest_group(c, W)
        if votes and max(votes.values()) / sum(votes.values()) >= s.consensus:
            decided = k
            break
    return decided, thr, traces[: decided or n]


@pytest.mark.parametrize("keep,consensus", [(0.5, 1.0), (0.2, 1.0), (0.9, 0.6), (0.3, 0.8)])
def test_deepconf_online_against_reference(keep, consensus):
    pol = ScriptedPolicy(seed=4)
    n = 8
    s = settings(deepconf_keep=keep, consensus=consensus, deepconf_warmup=3)
    res = deepconf(pol, None, PROMPTS, n=n, settings=s, seed=SEEDS, extract=first_char)
    ids, fins = full_candidates(pol, PROMPTS, n, s, SEEDS)
    aborted_any = 0
    for p, prompt in enumerate(PROMPTS):
        decided, thr, traces = deepconf_reference(pol, prompt, ids[p], fins[p], s, n)
        info = res.prompt_info[p]
        assert info["decided_at"] == decided
        assert info["threshold"] == pytest.approx(thr, rel=1e-5)
        cands = res.candidates[p]
        assert [(c.token_ids, c.finish) for c in cands] == [(t[0], t[1]) for t in traces]
        aborted_any += info["aborted"]
        for c in cands:  # a row stops exactly when its window falls below the threshold
            if c.finish == "aborted":
                assert c.answer is None
                tc = c.token_confidence
                assert sum(tc[-3:]) / 3 < info["threshold"]
                assert all(sum(tc[i - 2:i + 1]) / 3 >= info["threshold"] * (1 + 1e-6) - 1e-6
                           for i in range(2, len(tc) - 1))
    if consensus == 1.0:
        assert aborted_any > 0  # a threshold this high stops some rows


def test_deepconf_batch_invariant_and_counts():
    pol = ScriptedPolicy(seed=4)
    s = settings(deepconf_keep=0.5, consensus=0.7, deepconf_warmup=2)
    both = deepconf(pol, None, PROMPTS, n=8, settings=s, seed=SEEDS, extract=first_char)
    for p in (0, 2):
        alone = deepconf(pol, None, [PROMPTS[p]], n=8, settings=s, seed=[SEEDS[p]], extract=first_char)
        assert alone.predictions[0] == both.predictions[p]
        assert [c.token_ids for c in alone.candidates[0]] == [c.token_ids for c in both.candidates[p]]
        assert alone.prompt_info[0] == both.prompt_info[p]
    # rows ride along until the host looks: the policy ran at least every token counted
    assert both.info["policy_forward_tokens"] >= both.compute.policy_tokens
    assert both.compute.policy_generated_tokens >= sum(len(c.token_ids) for row in both.candidates for c in row)


def test_accounting_exact_without_early_stop():
    pol = ScriptedPolicy(seed=4)
    s = settings(deepconf_keep=1.0, consensus=1.0)
    res = deepconf(pol, None, PROMPTS, n=5, settings=s, seed=SEEDS, extract=first_char)
    # keep=1.0: the threshold is the warm-up's minimum, consensus 1.0 never settles early; all 5 candidates
    # are returned, and the tokens counted are exactly theirs
    assert all(len(c) == 5 for c in res.candidates)
    assert res.compute.policy_generated_tokens == sum(len(c.token_ids) for row in res.candidates for c in row)
    assert res.compute.policy_prefill_tokens == sum(len(pol.encode(p)) for p in PROMPTS)
    assert pol.live_sessions == 0


# ----------------------------------------------------------------------------- adaptive consistency

@pytest.mark.parametrize("conf,parallel", [(0.6, 2), (0.8, 3), (0.95, 1)])
def test_adaptive_consistency_against_reference(conf, parallel):
    pol = ScriptedPolicy(seed=6)
    n = 10
    s = settings(stop_confidence=conf, parallel_samples=parallel)
    res = adaptive_consistency(pol, None, PROMPTS, n=n, settings=s, seed=SEEDS, extract=first_char)
    ids, _ = full_candidates(pol, PROMPTS, n, s, SEEDS)
    for p in range(len(PROMPTS)):
        answers = [first_char(pol.tokenizer.decode([t for t in x if t != 1], skip_special_tokens=True))
                   for x in ids[p]]
        k_ref = None
        for k in range(2, n + 1):
            c = Counter(a for a in answers[:k] if a is not None).most_common(2) + [(None, 0), (None, 0)]
            if c[0][1] and beta_settled(c[0][1], c[1][1], conf):
                k_ref = k
                break
        assert res.prompt_info[p]["decided_at"] == k_ref
        used = answers[: k_ref or n]
        assert [c.token_ids for c in res.candidates[p]] == ids[p][: k_ref or n]
        votes = Counter(a for a in used if a is not None)
        want = max(votes, key=lambda a: (votes[a], -used.index(a))) if votes else None
        assert res.predictions[p] == want
        # every token spent on the prompt: its returned candidates whole, those started past the decision
        # each a prefix of majority's candidate of its index
        info = res.prompt_info[p]
        assert info["started"] >= (k_ref or n)
        returned = sum(len(x) for x in ids[p][: k_ref or n])
        assert returned <= info["tokens"] <= sum(len(x) for x in ids[p][: info["started"]])
    assert res.compute.policy_generated_tokens == sum(i["tokens"] for i in res.prompt_info)


def test_adaptive_consistency_batch_invariant():
    pol = ScriptedPolicy(seed=6)
    s = settings(stop_confidence=0.8, parallel_samples=2)
    both = adaptive_consistency(pol, None, PROMPTS, n=10, settings=s, seed=SEEDS, extract=first_char)
    alone = adaptive_consistency(pol, None, [PROMPTS[1]], n=10, settings=s, seed=[SEEDS[1]], extract=first_char)
    assert alone.predictions[0] == both.predictions[1]
    assert [c.token_ids for c in alone.candidates[0]] == [c.token_ids for c in both.candidates[1]]


# ----------------------------------------------------------------------------- speculative rejection

def test_rejection_ties_go_to_the_later_candidate():
    """Scores within TIE of each other tie, whatever their last bits: the later candidate goes first; NaN first."""
    from tts_kernels.search.early_stop import Rejection

    rule = Rejection(8, checkpoint_tokens=4, rate=0.5)
    nan = float("nan")
    assert rule.reject([(0, 0.5), (1, 0.5 * (1 - 1e-7)), (2, 0.9), (3, 0.9)]) == {1, 0}
    assert rule.reject([(0, 0.5 * (1 - 1e-7)), (1, 0.5), (2, 0.9), (3, 0.9)]) == {1, 0}  # (the same, either way)
    assert rule.reject([(0, 0.5), (1, 0.6), (2, 0.4), (3, nan)]) == {3, 2}
    assert rule.reject([(0, 0.3), (1, 0.3 * (1 + 1e-7)), (2, 0.3), (3, 0.9)]) == {2, 1}
    assert rule.reject([(5, 0.2)]) == set()  # at least one kept
    from tts_kernels.search.early_stop import tie_classes

    assert tie_classes([0.3, nan, 0.1, 0.3 * (1 + 1e-7), 0.2, nan]) == [[1, 5], [2], [4], [0, 3]]
    assert tie_classes([]) == [] and tie_classes([1.0, 1.0]) == [[0, 1]]


def test_speculative_rejection_rule():
    pol, ver = ScriptedPolicy(seed=8), ScriptedVerifier()
    n = 8
    s = settings(checkpoint_tokens=4, rejection_rate=0.5, max_new_tokens=16)
    res = speculative_rejection(pol, ver, PROMPTS, n=n, settings=s, seed=SEEDS, extract=first_char)
    ids, fins = full_candidates(pol, PROMPTS, n, s, SEEDS)
    for p, prompt in enumerate(PROMPTS):
        cands = res.candidates[p]
        assert len(cands) == n
        live = list(range(n))
        for t in range(4, 16, 4):  # the reference: at each checkpoint, the live rows' partial scores
            live = [j for j in live if len(ids[p][j]) > t]  # finished by token t: not scored
            if not live:
                break
            texts = [pol.tokenizer.decode(ids[p][j][:t], skip_special_tokens=True) for j in live]
            sc = ver.score_steps([prompt] * len(live), [[split_steps(x, s.step_delimiter)] for x in texts],
                                 agg=s.agg).aggregate.reshape(-1).tolist()
            drop = min(int(0.5 * len(live)), len(live) - 1)
            order = sorted(zip(live, sc), key=lambda x: (x[1] if x[1] == x[1] else -math.inf, -x[0]))
            gone = {j for j, _ in order[:drop]}
            for j in gone:
                assert cands[j].finish == "rejected" and cands[j].token_ids == ids[p][j][:t]
            live = [j for j in live if j not in gone]
        for j, c in enumerate(cands):
            if c.finish != "rejected":
                assert c.token_ids == ids[p][j] and c.finish == fins[p][j]
        kept = [c for c in cands if c.finish != "rejected"]
        sc = [c.score if c.finish != "rejected" and c.score == c.score else -1e9 for c in cands]
        best = max(range(len(cands)), key=lambda j: (sc[j], -j))
        assert res.chosen[p] == best and kept
    assert res.compute.prm_tokens > 0
    assert res.compute.policy_generated_tokens == sum(len(c.token_ids) for row in res.candidates for c in row)


# ----------------------------------------------------------------------------- the paged cache

@pytest.fixture(scope="module")
def llama_policy():
    model = tiny_llama(3)
    with torch.no_grad():  # a peaked next-token distribution (a random tiny model's is nearly flat)
        model.lm_head.weight.mul_(40)
    return HFPolicy(model, char_tokenizer())


def test_release_frees_blocks_and_leaves_other_rows(llama_policy):
    pol = llama_policy
    ids = [pol.encode("Q: 12+30?\nA:")]
    sess = pol.start(ids, rows_hint=4, max_new_tokens=40)
    ref = pol.start(ids, rows_hint=4, max_new_tokens=40)
    try:
        for x in (sess, ref):
            x.fork(torch.zeros(4, dtype=torch.long))
        toks = torch.tensor([5, 6, 7, 8])
        for _ in range(20):  # every row writes blocks of its own
            sess.decode(toks)
            ref.decode(toks)
        kv = sess.cache.kv
        free0 = kv.num_free_blocks
        mask = torch.tensor([False, True, False, True])
        sess.release(mask)
        assert kv.num_free_blocks > free0
        lens = sess.cache.lengths()
        assert lens[1] == 0 and lens[3] == 0 and lens[0] > 0
        for _ in range(5):
            sess.decode(toks, active=~mask)
            ref.decode(toks)
        assert torch.allclose(sess.logits[~mask], ref.logits[~mask], atol=1e-5)
    finally:
        sess.free()
        ref.free()


def test_deepconf_on_llama_frees_blocks_and_matches_majority(llama_policy):
    pol = llama_policy
    prompts = ["Q: 12+30?\nA:", "Q: 2*3?\nA:"]
    s = Settings(temperature=1.0, max_new_tokens=30, sync_every=4, confidence_window=2, deepconf_keep=0.5,
                 deepconf_warmup=2, consensus=1.0)
    full = deepconf(pol, None, prompts, n=6, settings=s.replace(deepconf_keep=1.0), seed=[1, 2], extract=first_char)
    res = deepconf(pol, None, prompts, n=6, settings=s, seed=[1, 2], extract=first_char, track_blocks=True)
    assert sum(i["aborted"] for i in res.prompt_info) > 0
    for p in range(2):
        for a, b in zip(res.candidates[p], full.candidates[p]):  # an aborted candidate is a prefix of the full one
            assert b.token_ids[: len(a.token_ids)] == a.token_ids
    assert res.compute.policy_generated_tokens < full.compute.policy_generated_tokens
    assert pol.kv_ledger.blocks == 0
    assert res.info["blocks_in_use"] and all(b >= 0 for _, b in res.info["blocks_in_use"])


def test_stop_strings_cut_as_majority_does():
    pol = ScriptedPolicy(seed=2)
    s = settings(stop=("d",))
    res = deepconf_offline(pol, None, PROMPTS, n=5, settings=s, seed=SEEDS, extract=first_char)
    texts, _, fins, _ = sample_completions(pol, PROMPTS, 5, max_new_tokens=s.max_new_tokens, temperature=1.0,
                                           seed=SEEDS, sync_every=s.sync_every, stop=["d"])
    assert any(f == "stop" for row in fins for f in row)
    for p in range(len(PROMPTS)):
        assert [c.text for c in res.candidates[p]] == texts[p]
        assert [c.finish for c in res.candidates[p]] == fins[p]


def test_text_level_engine_refused():
    class TextSession:
        rows, generate, logits = 1, None, torch.zeros(1, 4)
        freed = False

        def free(self):
            TextSession.freed = True

    class TextPolicy(ScriptedPolicy):
        def start(self, prompt_ids, **kw):
            return TextSession()

    with pytest.raises(ValueError, match="text-level engine"):
        deepconf(TextPolicy(seed=0), None, PROMPTS[:1], n=2, settings=settings())
    assert TextSession.freed


def test_speculative_rejection_incremental_scores_equal_whole_scoring(llama_policy):
    from transformers import LlamaForTokenClassification

    from tts_kernels.models.prm import HFPRM

    tok = char_tokenizer()
    prm = HFPRM(tiny_llama(4, cls=LlamaForTokenClassification, num_labels=2), tok, head="classifier")
    prompts = ["Q: 12+30?\nA:", "Q: 2*3?\nA:"]
    s = Settings(temperature=1.0, max_new_tokens=24, sync_every=4, checkpoint_tokens=6, rejection_rate=0.5,
                 step_delimiter=" ")  # short steps: the checkpoints see complete steps and partial tails
    res = speculative_rejection(llama_policy, prm, prompts, n=4, settings=s, seed=[3, 4], extract=first_char)
    assert sum(i["rejected"] for i in res.prompt_info) > 0
    kept = [(p, c) for p in range(2) for c in res.candidates[p] if c.finish != "rejected"]
    whole = prm.score_steps([prompts[p] for p, _ in kept], [[split_steps(c.text, " ")] for _, c in kept], agg="last")
    for (_, c), ref in zip(kept, whole.aggregate.reshape(-1).tolist()):
        assert c.score == pytest.approx(ref, rel=1e-4, abs=1e-5)
