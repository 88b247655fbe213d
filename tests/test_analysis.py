"""analysis/stats.py on hand-made routing decisions: every number computed by hand here."""
import math
import random

import pytest
import torch

from megatron_mole.analysis.stats import add_sums, mutual_information, routing_sums, select_experts, summarize

DOMAINS = ["a", "b"]


def test_sums_and_summary_by_hand():
    # 5 tokens, top-2 over 3 experts; token 2 uses one slot only; token 4 is padding (-1).
    expert_idx_TK = torch.tensor([[0, 1], [0, 2], [2, 1], [1, 0], [2, 0]])
    valid_TK = torch.tensor([[True, True], [True, True], [True, False], [True, True], [True, True]])
    domain_T = torch.tensor([0, 0, 1, 1, -1])
    probs_TE = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3],
                             [0.9, 0.05, 0.05]])
    sums = routing_sums(expert_idx_TK, domain_T, 2, 3, probs_TE, valid_TK)
    assert sums["uses_DE"].tolist() == [[2, 1, 1], [1, 1, 1]]
    assert sums["tokens_D"].tolist() == [2, 2]
    assert sums["experts_D"].tolist() == [4, 3]
    h = [math.log(2), 0.0, -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)), math.log(3)]
    assert sums["entropy_D"].tolist() == pytest.approx([h[0] + h[1], h[2] + h[3]])

    s = summarize(sums, DOMAINS)
    assert s["load"] == {"a": [0.5, 0.25, 0.25], "b": pytest.approx([1 / 3] * 3)}
    assert s["load_all"] == pytest.approx([3 / 7, 2 / 7, 2 / 7])
    assert s["experts_per_token"] == {"a": 2.0, "b": 1.5, "all": 7 / 4}
    assert s["entropy"]["a"] == pytest.approx(h[0] / 2) and s["entropy"]["all"] == pytest.approx(sum(h) / 4)
    # I(D;E) from the joint of uses [[2,1,1],[1,1,1]] / 7
    joint = [[2 / 7, 1 / 7, 1 / 7], [1 / 7, 1 / 7, 1 / 7]]
    p_d, p_e = [4 / 7, 3 / 7], [3 / 7, 2 / 7, 2 / 7]
    mi = sum(joint[d][e] * math.log(joint[d][e] / (p_d[d] * p_e[e])) for d in range(2) for e in range(3))
    assert s["mutual_information"] == pytest.approx(mi)
    assert s["specialisation"] == pytest.approx(mi / -(sum(p * math.log(p) for p in p_d)))
    assert s["max_entropy"] == pytest.approx(math.log(3))
    # sums add: two halves give the whole
    first = routing_sums(expert_idx_TK[:2], domain_T[:2], 2, 3, probs_TE[:2], valid_TK[:2])
    rest = routing_sums(expert_idx_TK[2:], domain_T[2:], 2, 3, probs_TE[2:], valid_TK[2:])
    both = add_sums(add_sums(None, first), rest)
    assert all(torch.equal(both[k], sums[k]) for k in sums)


def test_specialisation_extremes():
    # each domain on its own expert (top-1): the expert determines the domain
    perfect = torch.tensor([[5.0, 0.0], [0.0, 3.0]])
    mi, h = mutual_information(perfect)
    assert mi == pytest.approx(h) and h == pytest.approx(-(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8)))
    # both domains spread alike: no information
    assert mutual_information(torch.tensor([[2.0, 6.0], [1.0, 3.0]]))[0] == pytest.approx(0.0, abs=1e-12)
    s = summarize({"uses_DE": perfect, "tokens_D": torch.tensor([5.0, 3.0]),
                   "entropy_D": torch.zeros(2), "experts_D": torch.tensor([5.0, 3.0])}, DOMAINS)
    assert s["specialisation"] == pytest.approx(1.0)


def test_select_experts_ranking_by_hand():
    # uses per expert over a probe set; ties (experts 1 and 4, 3 and 5) go to the lower id
    uses_E = [4, 9, 0, 7, 9, 7]
    assert select_experts(uses_E, 1) == [1]
    assert select_experts(uses_E, 4) == [1, 4, 3, 5]
    assert select_experts(torch.tensor(uses_E), 6) == [1, 4, 3, 5, 0, 2]
    with pytest.raises(ValueError, match="--select 7"):
        select_experts(uses_E, 7)


def test_bad_decisions_name_the_problem():
    with pytest.raises(ValueError, match="expert ids"):
        routing_sums(torch.tensor([[3]]), torch.tensor([0]), 1, 3)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        routing_sums(torch.tensor([0, 1]), torch.tensor([0, 0]), 1, 3)


def test_conflict_data_conflicts_and_held_out_prompts_are_new():
    from tools import conflict as C

    train = C.records(30, seed=0)
    heldout = C.records(10, seed=1, exclude=frozenset(r["prompt"] for r in train))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert sorted({r["domain"] for r in train}) == sorted(C.DOMAINS)
    # the same words under the four tags: four different answers, one prompt form
    words, answers = set(), {}
    for domain in C.DOMAINS:
        prompt, answers[domain] = C.make_example(domain, random.Random(5))
        tag, text = prompt.removeprefix("Rewrite (").split("): ")
        assert tag == C.TAGS[domain]
        words.add(text)
    assert len(words) == 1  # the same input words under every tag
    assert len(set(answers.values())) == 4 or answers["reverse"] == answers["copy"]  # unless w1 == w2
    # equal trainable parameters up to the routers: 4 experts x rank 4 = one LoRA of rank 16
    assert C.METHODS["lora"]["rank"] == C.METHODS["mole"]["num_experts"] * C.METHODS["mole"]["rank"]
