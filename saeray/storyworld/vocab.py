"""The storyworld lexicon: word categories, topics, function words, nonce words and the fact table.

Everything here is a fixed constant of the language (``LANGUAGE_VERSION`` names it): the corpus
seed changes which documents are drawn, never the words, categories or facts, so a model trained
on one seed answers fact questions about any other. See ``docs/storyworld.md`` for the grammar.

Choices recorded here:

* Every word belongs to at most one category (checked at import), so "the category of a token" is
  a function of the token and concept labels are unambiguous.
* Members are listed in rank order; within a category they are drawn with Zipf weights
  ``1 / (rank + 1) ** alpha`` so that concept features have a spread of frequencies (the regime
  Group Bias Adaptation is built for, arXiv 2506.14002). Person names are uniform so that every
  person's facts are stated equally often.
* The fact table is a fixed pseudo-random bijection drawn once from ``WORLD_SEED``: every person
  has exactly one home city, one job and one pet, and no two people share one, so every
  fact answer is a deterministic function of (relation, person) and the reverse lookup is too.
"""
from __future__ import annotations

import random

LANGUAGE_VERSION = "storyworld-2"
WORLD_SEED = 20240611

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# Semantic categories: the concepts whose features should emerge over training time, layer and size.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "horse", "cow", "sheep", "goat", "pig", "duck",
               "goose", "fox", "wolf", "bear", "deer", "rabbit", "mouse", "owl"),
    "colour": ("red", "blue", "green", "yellow", "black", "white", "brown", "grey",
               "pink", "purple", "gold", "silver", "violet", "amber", "teal", "crimson"),
    "city": ("oslo", "paris", "rome", "lima", "cairo", "tokyo", "delhi", "berlin",
             "madrid", "vienna", "dublin", "prague", "lisbon", "athens", "quito", "seoul"),
    "name": ("mia", "kai", "leo", "ava", "noah", "emma", "liam", "zoe",
             "omar", "nora", "ivan", "lena", "hugo", "ruth", "amir", "sofia"),
    "number": ("one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "twenty"),
    "food": ("bread", "apple", "cheese", "rice", "soup", "pear", "plum", "egg",
             "honey", "butter", "lemon", "melon", "bean", "corn", "cake", "nut"),
    "tool": ("hammer", "saw", "drill", "axe", "rake", "shovel", "wrench", "chisel",
             "ladder", "rope", "brush", "needle", "spade", "pliers", "lever", "hoe"),
    "body": ("hand", "foot", "head", "arm", "leg", "knee", "eye", "ear",
             "nose", "mouth", "tooth", "neck", "back", "heart", "finger", "shoulder"),
    "job": ("baker", "farmer", "doctor", "teacher", "pilot", "sailor", "tailor", "miner",
            "painter", "singer", "writer", "nurse", "judge", "hunter", "potter", "smith"),
    "instrument": ("drum", "flute", "harp", "violin", "piano", "trumpet", "bell", "guitar",
                   "lute", "banjo", "cello", "organ", "oboe", "tuba", "cymbal", "gong"),
    "place": ("barn", "field", "meadow", "stable",      # farm
              "oven", "pantry", "stove", "table",       # kitchen
              "station", "harbor", "airport", "road",   # travel
              "shed", "bench", "forge", "yard",         # workshop
              "hall", "stage", "choir", "studio",       # music
              "ward", "clinic", "pharmacy", "bed"),     # clinic
}

# Zipf exponent of the within-category draw (0 = uniform).
ZIPF_ALPHA: dict[str, float] = {c: 0.8 for c in CATEGORIES}
ZIPF_ALPHA["name"] = 0.0
ZIPF_ALPHA["place"] = 0.5

# Document topics: each owns four place words and reweights the sentence kinds (generator.py).
TOPICS: tuple[str, ...] = ("farm", "kitchen", "travel", "workshop", "music", "clinic")
TOPIC_PLACES: dict[str, tuple[str, ...]] = {
    t: CATEGORIES["place"][4 * i: 4 * i + 4] for i, t in enumerate(TOPICS)
}

# Nonce words: meaningless syllables used only for in-context copying (secret codes and guest
# names), so that predicting them later is possible only by looking back in the document.
NONCE: tuple[str, ...] = (
    "zib", "tok", "vex", "mup", "dax", "wug", "blick", "fep", "gorp", "lun", "quim", "rast",
    "snee", "tiv", "yom", "zark", "bozz", "clum", "drel", "frin", "glap", "hux", "jov", "kreb",
    "lorf", "mip", "narg", "plim", "reth", "sorv", "tump", "vosk",
)

# Verbs a guest does when mentioned again ("the guest zib smiles .").
GUEST_VERBS: tuple[str, ...] = ("smiles", "waits", "sleeps", "sings", "leaves", "laughs", "listens", "nods")

# Function words and punctuation. The quote mark is the same token when opening and closing a
# quotation, so "am I inside a quote" is contextual state a model has to track.
FUNCTION_WORDS: tuple[str, ...] = (
    ".", '"', "(", ")",
    "the", "a", "of", "is", "in", "as", "to", "at", "with", "and", "named",
    "lives", "works", "has", "pet", "home", "job", "travels", "eats", "sees", "buys", "says",
    "counts", "packs", "plays", "hurts", "uses", "meets", "guest", "arrives", "code",
)

# Fact relations: person -> attribute category, with the templates that state them (generator.py).
RELATIONS: dict[str, str] = {"home": "city", "job": "job", "pet": "animal"}


def _fact_table() -> dict[str, dict[str, str]]:
    rng = random.Random(WORLD_SEED)
    table: dict[str, dict[str, str]] = {rel: {} for rel in RELATIONS}
    for rel, cat in RELATIONS.items():
        values = list(CATEGORIES[cat])
        rng.shuffle(values)
        table[rel] = dict(zip(CATEGORIES["name"], values))
    return table


# FACTS[relation][person] -> attribute, e.g. FACTS["home"]["mia"].
FACTS: dict[str, dict[str, str]] = _fact_table()

# word -> category ("" for words outside every category).
WORD_CATEGORY: dict[str, str] = {w: c for c, ws in CATEGORIES.items() for w in ws}


def vocabulary() -> list[str]:
    """All tokens in id order: special tokens first, then function words, categories, nonce words."""
    words = list(SPECIAL_TOKENS) + list(FUNCTION_WORDS) + list(GUEST_VERBS)
    for ws in CATEGORIES.values():
        words.extend(ws)
    words.extend(NONCE)
    return words


def _check() -> None:
    seen: dict[str, str] = {}
    groups = {"function": FUNCTION_WORDS, "guest_verb": GUEST_VERBS, "nonce": NONCE, **CATEGORIES}
    for g, ws in groups.items():
        for w in ws:
            if w in seen:
                raise AssertionError(f"storyworld word '{w}' is in both '{seen[w]}' and '{g}'")
            seen[w] = g
    for c, ws in CATEGORIES.items():
        if len(ws) < 12:
            raise AssertionError(f"storyworld category '{c}' has {len(ws)} members; the language needs >= 12")


_check()
VOCAB: list[str] = vocabulary()
WORD_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
