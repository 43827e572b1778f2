"""The storyworld language: determinism, labels that agree with the text, the tokenizer, the truth.

Label checks re-derive every label from the words alone (templates, quote marks, brackets, the
counting sentence), independently of how the generator tracked them while writing.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from saeray.errors import InputError
from saeray.storyworld import generator as G
from saeray.storyworld.generator import (FACT_TEMPLATES, generate_doc, iter_docs, labels_table, next_token_truth,
                                         optimal_loss)
from saeray.storyworld.tokenizer import build_tokenizer, encode, save_tokenizer
from saeray.storyworld.vocab import BOS, CATEGORIES, FACTS, NONCE, RELATIONS, TOPICS, VOCAB, WORD_ID

N_DOCS = 150


@pytest.fixture(scope="module")
def docs():
    return list(iter_docs(N_DOCS, seed=3))


# ---- the language meets the floor ------------------------------------------------------------

def test_lexicon_floor():
    assert len(CATEGORIES) >= 8
    assert all(len(ws) >= 12 for ws in CATEGORIES.values())
    assert len(TOPICS) >= 4
    assert len(set(VOCAB)) == len(VOCAB)
    for rel, table in FACTS.items():  # a bijection person -> attribute
        assert set(table) == set(CATEGORIES["name"])
        assert len(set(table.values())) == len(table)


def test_topics_change_word_choice():
    """Category frequencies differ between topics: the topic is visible in the words."""
    by_topic: dict[str, Counter] = {t: Counter() for t in TOPICS}
    for d in iter_docs(300, seed=1):
        by_topic[d.topic].update(c for c in d.labels["category"] if c)
    share = {t: {c: n / sum(cnt.values()) for c, n in cnt.items()} for t, cnt in by_topic.items()}
    assert share["music"]["instrument"] > 3 * share["clinic"].get("instrument", 0)
    assert share["clinic"]["body"] > 2 * share["music"].get("body", 0)
    # and the place words follow the topic
    places = {t: Counter() for t in TOPICS}
    for d in iter_docs(300, seed=1):
        places[d.topic].update(w for w, c in zip(d.words, d.labels["category"][1:]) if c == "place")
    from saeray.storyworld.vocab import TOPIC_PLACES
    for t in TOPICS:
        own = sum(places[t][p] for p in TOPIC_PLACES[t])
        assert own / sum(places[t].values()) > 0.7, t


# ---- determinism ------------------------------------------------------------------------------------------

def test_same_seed_same_docs_different_seed_different():
    a = [generate_doc(i, seed=7) for i in range(20)]
    b = [generate_doc(i, seed=7) for i in range(20)]
    c = [generate_doc(i, seed=8) for i in range(20)]
    h = [generate_doc(i, seed=7, split="heldout") for i in range(20)]
    assert [d.words for d in a] == [d.words for d in b]
    for x, y in zip(a, b):
        for k in G.LABEL_FIELDS:
            assert np.array_equal(x.labels[k], y.labels[k])
    assert sum(x.words != y.words for x, y in zip(a, c)) >= 19
    assert sum(x.words != y.words for x, y in zip(a, h)) >= 19
    # a document does not depend on which other documents were generated before it
    assert generate_doc(13, seed=7).words == a[13].words
    # the harvest's label-free path draws the very same words
    assert [G.generate_words(i, seed=7) for i in range(20)] == [d.words for d in a]
    assert [G.generate_words(i, seed=7, split="heldout") for i in range(20)] == [d.words for d in h]


def test_bad_split_and_index():
    with pytest.raises(InputError, match="split"):
        generate_doc(0, split="test")
    with pytest.raises(InputError, match=">= 0"):
        generate_doc(-1)


# ---- labels agree with the text --------------------------------------------------------------------------

def _template_answers(words: list[str]) -> dict[int, tuple[str, str]]:
    """Every fact statement in the text by template matching: word index -> (relation, person)."""
    found: dict[int, tuple[str, str]] = {}
    names = set(CATEGORIES["name"])
    for rel, templates in FACT_TEMPLATES.items():
        for tpl in templates:
            parts = tpl.split()
            for s in range(len(words) - len(parts) + 1):
                who = None
                for k, part in enumerate(parts):
                    w = words[s + k]
                    if part == "{p}":
                        if w not in names:
                            break
                        who = w
                    elif part == "{a}":
                        if w not in CATEGORIES[RELATIONS[rel]]:
                            break
                    elif w != part:
                        break
                else:
                    found[s + len(parts) - 1] = (rel, who)
    return found


def test_category_labels_match_vocab(docs):
    for d in docs:
        assert d.labels["category"][0] == ""
        for w, c in zip(d.words, d.labels["category"][1:]):
            expect = next((cat for cat, ws in CATEGORIES.items() if w in ws), "")
            assert c == expect, (w, c)


def test_fact_answers_equal_the_fact_table(docs):
    n = 0
    for d in docs:
        lab = d.labels
        found = {}
        for i, (rel, who) in _template_answers(d.words).items():
            found[i + 1] = (rel, who)  # +1: label arrays are indexed by token position (BOS = 0)
        labelled = {int(p): (lab["fact_relation"][p], lab["fact_entity"][p])
                    for p in np.flatnonzero(lab["is_fact_answer"])}
        assert labelled == found, d.text
        for p, (rel, who) in labelled.items():
            assert d.tokens[p] == FACTS[rel][who]
            assert lab["category"][p] == RELATIONS[rel]
            n += 1
        # within one document a fact is stated at most once (recall must come from the weights)
        assert len(set(labelled.values())) == len(labelled)
    assert n >= 3 * len(docs)
    assert {r for d in docs for r in d.labels["fact_relation"] if r} == set(FACT_TEMPLATES)


def test_copy_targets_repeat_earlier_tokens(docs):
    kinds = Counter()
    for d in docs:
        toks, lab = d.tokens, d.labels
        for p in np.flatnonzero(lab["is_copy_target"]):
            src = int(lab["copy_src"][p])
            assert 0 < src < p
            assert toks[p] == toks[src] and toks[p] in NONCE
            kinds[lab["copy_kind"][p]] += 1
        # recomputed from the text: a guest's later mentions, and a code repeated word for word
        guest = code = None
        for i, w in enumerate(toks):
            if toks[i - 3: i] == ["a", "guest", "named"]:
                guest = w
            elif toks[i - 2: i] == ["the", "guest"]:
                assert w == guest and lab["is_copy_target"][i] and lab["copy_kind"][i] == "guest"
            elif toks[i - 1] == "code" and w != ".":
                j, seq = i, []
                while toks[j] != ".":
                    seq.append(j)
                    j += 1
                if code is None:
                    code = [toks[k] for k in seq]
                    assert not lab["is_copy_target"][seq].any()
                else:
                    assert [toks[k] for k in seq] == code
                    assert lab["is_copy_target"][seq].all() and set(lab["copy_kind"][seq]) == {"code"}
        assert lab["is_copy_target"].sum() == sum(
            1 for i in range(2, len(toks)) if toks[i - 2: i] == ["the", "guest"]) + sum(
            1 for p in np.flatnonzero(lab["copy_kind"] == "code"))
    assert kinds["code"] > 0 and kinds["guest"] > 0


def test_quote_depth_and_count_follow_the_text(docs):
    saw = Counter()
    for d in docs:
        inside, depth, count = False, 0, 0
        for i, w in enumerate(d.tokens):
            if w == '"':
                # the marks themselves are outside; words strictly between them are inside
                assert not d.labels["in_quote"][i]
                inside = not inside
            else:
                assert d.labels["in_quote"][i] == inside, (i, d.text)
                saw["quote"] += inside
            if w == "(":
                depth += 1
                assert d.labels["depth"][i] == depth   # a bracket carries the level of its pair
            elif w == ")":
                assert d.labels["depth"][i] == depth
                depth -= 1
            else:
                assert d.labels["depth"][i] == depth
            saw["depth2"] += depth >= 2
            # counting: "counts one two three ..." numbers the k-th number k
            if d.tokens[i - 1] == "counts" and i > 0:
                count = 1
            elif count and w in CATEGORIES["number"] and d.tokens[i - 1] in CATEGORIES["number"]:
                count += 1
            else:
                count = 0
            assert d.labels["count"][i] == count, (i, d.text)
            if count:
                assert w == CATEGORIES["number"][count - 1]
                saw["count"] += 1
        assert not inside and depth == 0
    assert saw["quote"] > 0 and saw["depth2"] > 0 and saw["count"] > 0


# ---- Arrow labels ---------------------------------------------------------------------------------------------

def test_labels_table_rows_and_join_key(docs):
    import pyarrow as pa

    t = labels_table(docs[:5])
    assert t.num_rows == sum(len(d.tokens) for d in docs[:5])
    for col, typ in (("doc", pa.int64()), ("pos", pa.int32()), ("token", pa.string()), ("is_fact_answer", pa.bool_()),
                     ("depth", pa.int8()), ("topic", pa.string()), ("category", pa.string())):
        assert t.schema.field(col).type == typ
    keys = list(zip(t["doc"].to_pylist(), t["pos"].to_pylist()))
    assert len(set(keys)) == len(keys)
    d = docs[2]
    rows = t.filter(pa.compute.equal(t["doc"], d.index)).to_pylist()
    assert [r["pos"] for r in rows] == list(range(len(d.tokens)))
    assert rows[0]["token"] == BOS and [r["token"] for r in rows[1:]] == d.words
    assert [r["token_id"] for r in rows] == d.token_ids
    assert all(r["topic"] == d.topic for r in rows)
    for p, r in enumerate(rows):
        assert r["is_fact_answer"] == d.labels["is_fact_answer"][p]
        assert r["in_quote"] == d.labels["in_quote"][p]
        nxt = d.tokens[p + 1] if p + 1 < len(d.tokens) else None
        assert r["next_token"] == nxt
        assert r["next_is_fact_answer"] == (nxt is not None and bool(d.labels["is_fact_answer"][p + 1]))


# ---- tokenizer -------------------------------------------------------------------------------------------------

def test_tokenizer_round_trip(tmp_path, docs):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = build_tokenizer()
    assert tok.vocab_size == len(VOCAB)
    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(loaded, PreTrainedTokenizerFast)
    for d in docs[:20]:
        ids = loaded(d.text).input_ids
        assert ids == d.token_ids == encode(d.words)
        assert ids[0] == WORD_ID[BOS]
        assert loaded.convert_ids_to_tokens(ids) == d.tokens
        assert loaded.decode(ids, skip_special_tokens=True).split() == d.words
    assert loaded("mia lives in blorp").input_ids[-1] == loaded.unk_token_id


# ---- the true next-token distribution and the optimal loss ----------------------------------------------------

def test_truth_is_consistent_with_labels(docs):
    final_post = []
    for d in docs[:40]:
        tr = next_token_truth(d)
        n = len(d.tokens)
        assert tr.p_next.shape == (n,) and math.isnan(tr.p_next[-1])
        assert (tr.p_next[:-1] > 0).all() and (tr.p_next[:-1] <= 1 + 1e-12).all()
        assert (tr.entropy[:-1] >= -1e-12).all()
        # a fact answer or copy target is fully determined by its prefix: the generator knows it
        for p in np.flatnonzero(d.labels["is_fact_answer"] | d.labels["is_copy_target"]):
            assert tr.determined[p - 1] and tr.argmax[p - 1] == d.tokens[p]
            assert tr.p_next[p - 1] == pytest.approx(1.0)
        assert tr.topic_posterior[0] == pytest.approx(1 / len(TOPICS))
        final_post.append(tr.topic_posterior[-1])
    # the topic posterior concentrates on the true topic as the document goes on
    assert np.mean(final_post) > 0.7 and np.mean(np.array(final_post) > 1 / len(TOPICS)) > 0.9


def test_truth_matches_sampling_frequencies():
    """The reported first-word distribution equals what the sampler actually draws."""
    first = Counter(generate_doc(i, seed=11).words[0] for i in range(3000))
    tr = next_token_truth(generate_doc(0, seed=11))
    # the distribution at position 0 is the same for every document: rebuild it from the process
    d0 = G.mix([(1.0 / len(TOPICS), next(G._story(G._Ctx(), t))) for t in TOPICS])
    assert tr.p_next[0] == pytest.approx(d0.prob(generate_doc(0, seed=11).words[0]))
    for w, p in d0.items():
        assert first[w] / 3000 == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 3000) + 1e-3), w


def test_optimal_loss_sanity(docs):
    sub = docs[:40]
    opt = optimal_loss(sub)
    assert opt == pytest.approx(np.mean(np.concatenate([-np.log(next_token_truth(d).p_next[:-1]) for d in sub])))
    # a unigram model fitted on the same documents (an upper bound any model should beat) is far worse
    cnt = Counter(w for d in sub for w in d.words)
    tot = sum(cnt.values())
    unigram = -np.mean([math.log(cnt[w] / tot) for d in sub for w in d.words])
    assert 0.5 < opt < unigram - 1.0
    # and the truth beats the same language with its topic hidden: knowing the prefix helps
    assert opt < 2.0
