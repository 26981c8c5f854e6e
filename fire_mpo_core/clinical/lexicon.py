"""Clinical lexicon of the rules judge: normalisation, term categories, antonyms, vocabularies.

Words are compared by *key*: lowercase, number words as digits ("two" -> "2"), British spellings
and exact synonyms folded ("tumour" -> "tumor", "top" -> "upper", "axial" -> "transverse",
"x-ray" / "xr" / "radiograph" -> "xray"), and a plural "s" stripped ("lungs" -> "lung"). Keys only
decide *equality*; edits always write surface words, so a synonym is never swapped for another
(the paper's "no synonym swaps": two words with the same key are the same answer).

A :class:`Lexicon` tags each key with the categories it belongs to (``side``, ``vertical``,
``size``, ``intensity``, ``shape``, ``modality``, ``plane``, ``color``, ``count``, ``organ``,
``abnormality``, ...) and holds the answer vocabulary of each category, built from the dataset's
records on top of a small built-in clinical lexicon::

    lex = Lexicon.from_records(records)          # records: Iterable[VQARecord]
    lex.tags("lungs")                            # {'organ', 'location'}
    lex.vocabulary("organ")                      # [Phrase('liver', ('liver',)), ...]

Antonyms (:func:`antonym`) give the plausible wrong alternative of a correct answer word: yes/no,
left/right, upper/lower, small/large, ct/mri, hyperdense/hypodense, counts one <-> two, ...
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fire_mpo_core.data.records import VQARecord

#: Word tokens: letters/digits, a decimal part, an apostrophe suffix ("isn't", "patient's").
TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:\.[0-9]+)?(?:['’][A-Za-z]+)?")


def _words(text: str) -> list[str]:
    return text.split()


ARTICLES = frozenset({"a", "an", "the"})
#: Function words: never tagged as clinical terms, never part of an answer's content keys.
FUNCTION_WORDS = ARTICLES | frozenset(
    {
        "of", "and", "or", "to", "in", "on", "at", "by", "for", "from", "with", "into", "is",
        "are", "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "there",
        "as", "vs", "than", "which", "what", "where", "how", "not", "can", "may", "has", "have",
        "patient", "patient's", "very", "also", "seen", "see",
    }
)  # fmt: skip
#: Words that may be left out without changing an answer ("Transverse Plane" == "transverse").
SOFT_WORDS = frozenset(
    {"plane", "side", "view", "section", "region", "area", "aspect", "portion", "part", "image",
     "scan", "film", "weighted", "quadrant"}
)  # fmt: skip

NUMBER_WORDS: dict[str, int] = {
    w: i
    for i, w in enumerate(
        _words(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen twenty"
        )
    )
}
DIGIT_WORDS: dict[int, str] = {i: w for w, i in NUMBER_WORDS.items()}
#: Words meaning a count of zero (only in count questions: "there are no lesions" -> 0).
ZERO_WORDS = frozenset({"no", "none", "zero", "0"})

#: Exact synonyms and spelling variants folded to one key.
ALIASES: dict[str, str] = {
    "xr": "xray", "radiograph": "xray", "radiography": "xray", "cxr": "xray", "mr": "mri",
    "tumour": "tumor", "oedema": "edema", "haemorrhage": "hemorrhage", "grey": "gray",
    "centre": "center", "middle": "center", "top": "upper", "bottom": "lower",
    "superior": "upper", "inferior": "lower", "big": "large", "tiny": "small", "huge": "large",
    "axial": "transverse", "circular": "round", "hyperintense": "hyperdense",
    "hypointense": "hypodense", "ultrasonography": "ultrasound", "us": "ultrasound",
    "unremarkable": "normal",
}  # fmt: skip
#: Multi-word synonyms merged into one token key (hyphens and spaces both join).
MULTI_ALIASES: dict[tuple[str, ...], str] = {
    ("x", "ray"): "xray",
    ("computed", "tomography"): "ct",
    ("magnetic", "resonance", "imaging"): "mri",
    ("magnetic", "resonance"): "mri",
    ("chest", "x", "ray"): "xray",
}
#: Canonical display of acronyms (a replacement in a non-lowercase context is written this way).
DISPLAY: dict[str, str] = {
    "ct": "CT", "mri": "MRI", "t1": "T1", "t2": "T2", "flair": "FLAIR", "pet": "PET",
    "dwi": "DWI", "adc": "ADC", "ivc": "IVC", "csf": "CSF", "pa": "PA", "ap": "AP",
    "xray": "X-ray",
}  # fmt: skip

#: Built-in clinical vocabulary by category (keys).
BUILTIN: dict[str, frozenset[str]] = {
    "side": frozenset({"left", "right", "bilateral"}),
    "vertical": frozenset({"upper", "lower", "center"}),
    "size": frozenset({"small", "medium", "large"}),
    "intensity": frozenset({"hyperdense", "hypodense", "isodense", "hyperechoic", "hypoechoic"}),
    "shape": frozenset({"round", "oval", "irregular", "lobulated", "spiculated"}),
    "modality": frozenset({"ct", "mri", "xray", "ultrasound", "pet", "t1", "t2", "flair", "dwi"}),
    "plane": frozenset({"transverse", "coronal", "sagittal"}),
    "color": frozenset({"black", "white", "gray"}),
    "presence": frozenset({"present", "absent"}),
    "severity": frozenset({"mild", "moderate", "severe"}),
    "state": frozenset({"normal", "abnormal", "enlarged", "clear", "intact", "opacified"}),
    "organ": frozenset(
        _words(
            "lung liver heart brain kidney spleen pancreas stomach colon bowel rectum bladder "
            "esophagus trachea bronchus rib spine vertebra aorta chest abdomen pelvis head neck "
            "skull gallbladder uterus prostate thyroid mediastinum diaphragm intestine duodenum "
            "breast bone ventricle lobe hemisphere cerebellum thorax cardiomediastinal cardiac "
            "mediastinal silhouette hemidiaphragm humerus clavicle scapula sternum hilum hila "
            "vasculature vascularity"
        )
    ),
    "abnormality": frozenset(
        _words(
            "lesion nodule mass tumor opacity consolidation effusion pneumothorax cardiomegaly "
            "edema atelectasis fracture granuloma infiltrate infiltration pneumonia emphysema "
            "hernia calcification cyst fibrosis metastasis abscess hemorrhage bleeding infarct "
            "aneurysm stone gallstone cancer carcinoma lymphadenopathy hydrocephalus scarring "
            "thickening collapse disease scoliosis dextroscoliosis levoscoliosis kyphosis "
            "spondylosis osteopenia hyperinflation hyperexpansion adenopathy bronchiectasis "
            "pneumoperitoneum elevation"
        )
    ),
}
#: Finding nouns that describe the same kind of focal finding (aligned in reports, never swapped).
LESION_LIKE = frozenset({"lesion", "nodule", "mass", "tumor", "opacity"})
#: Attribute classes compared between a report sentence and its reference sentence.
ATTRIBUTE_CLASSES: tuple[str, ...] = (
    "side", "vertical", "size", "intensity", "shape", "count", "severity", "state",
)  # fmt: skip
#: Keys of the "normal" and "abnormal" values of the ``state`` class (compared as two groups).
NORMAL_STATES = frozenset({"normal", "clear", "intact"})

#: Surface antonyms: the plausible wrong alternative of a correct word (same word family).
ANTONYMS: dict[str, str] = {
    "left": "right", "right": "left", "upper": "lower", "lower": "upper", "top": "bottom",
    "bottom": "top", "superior": "inferior", "inferior": "superior", "small": "large",
    "large": "small", "big": "small", "tiny": "large", "huge": "small", "medium": "large",
    "hyperdense": "hypodense", "hypodense": "hyperdense", "hyperintense": "hypointense",
    "hypointense": "hyperintense", "hyperechoic": "hypoechoic", "hypoechoic": "hyperechoic",
    "bright": "dark", "dark": "bright", "brighter": "darker", "darker": "brighter",
    "round": "irregular", "oval": "irregular", "circular": "irregular", "irregular": "round",
    "ct": "mri", "mri": "ct", "x-ray": "ct", "xray": "ct", "radiograph": "ct", "t1": "t2",
    "t2": "t1", "axial": "coronal", "transverse": "coronal", "coronal": "sagittal",
    "sagittal": "coronal", "black": "white", "white": "black", "gray": "white", "grey": "white",
    "present": "absent", "absent": "present", "normal": "abnormal", "abnormal": "normal",
    "unremarkable": "abnormal", "enlarged": "normal", "mild": "severe", "severe": "mild",
    "moderate": "severe", "anterior": "posterior", "posterior": "anterior", "medial": "lateral",
    "increased": "decreased", "decreased": "increased", "yes": "no", "no": "yes",
    "lateral": "medial", "proximal": "distal", "distal": "proximal", "internal": "external",
    "external": "internal", "first": "second", "second": "first", "third": "fourth",
    "fourth": "third", "frontal": "occipital", "occipital": "frontal", "benign": "malignant",
    "malignant": "benign", "acute": "chronic", "chronic": "acute", "solid": "cystic",
    "cystic": "solid", "male": "female", "female": "male", "supine": "prone", "prone": "supine",
}  # fmt: skip
#: Suffixes after "hyper"/"hypo" for which the prefix swap is a word (hyperattenuating).
_HYPER_SUFFIXES = (
    "dense", "density", "intense", "intensity", "echoic", "attenuating", "attenuation",
    "inflation", "enhancing", "metabolic", "vascular", "plastic", "trophic", "tension",
)  # fmt: skip
_ORDINAL_RE = re.compile(r"(\d+)(st|nd|rd|th)")

#: Question types of SynthLesion, SLAKE (content_type) and VQA-RAD mapped to lexicon categories.
QTYPE_CATEGORY: dict[str, str] = {
    "presence": "presence", "pres": "presence", "prse": "presence",
    "location": "location", "position": "location", "pos": "location", "quadrant": "location",
    "side": "side", "laterality": "side",
    "count": "count", "quantity": "count", "number": "count",
    "size": "size", "modality": "modality", "plane": "plane", "organ": "organ",
    "abnormality": "abnormality", "abn": "abnormality", "abnormal": "abnormality",
    "finding": "abnormality", "color": "color", "colour": "color", "shape": "shape",
    "intensity": "intensity", "attrib": "attribute", "atrib": "attribute",
    "attribute": "attribute", "kg": "other", "other": "other", "report": "report",
}  # fmt: skip
#: Categories whose answers may use the words of other categories (a location names an organ).
CATEGORY_GROUPS: dict[str, frozenset[str]] = {
    "location": frozenset({"location", "side", "vertical", "organ"}),
}
_ATTRIBUTE_CATEGORIES = frozenset(
    {"side", "vertical", "size", "intensity", "shape", "modality", "plane", "color", "presence",
     "severity", "state", "count"}
)  # fmt: skip
#: Catch-all categories: never borrowed into another question's group through shared words.
_CATCH_ALL = frozenset({"other", "attribute", "presence", "report"})


def stem(word: str) -> str:
    """Strip an English plural (lowercase input): lungs -> lung, arteries -> artery, masses ->
    mass; words ending in ss/us/is (pelvis, sinus) and short words are kept."""
    if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("sses"):
        return word[:-2]
    return word[:-1]


def word_key(word: str) -> str:
    """Comparison key of one word: lowercase, number words as digits, aliases folded, singular."""
    w = word.lower().replace("’", "'")
    if w in NUMBER_WORDS:
        return str(NUMBER_WORDS[w])
    if w in ALIASES:
        return ALIASES[w]
    s = stem(w)
    return ALIASES.get(s, s)


def is_number(key: str) -> bool:
    return re.fullmatch(r"\d+(?:\.\d+)?", key) is not None


@dataclass(frozen=True)
class Token:
    """A word of a text: ``text[start:end] == surface``; ``key`` as :func:`word_key` (multi-word
    aliases such as "X-Ray" or "computed tomography" are one token)."""

    surface: str
    key: str
    start: int
    end: int

    @property
    def lower(self) -> str:
        return self.surface.lower().replace("’", "'")


def tokenize(text: str) -> list[Token]:
    """Word tokens with character offsets, multi-word aliases merged (joined by space/hyphen)."""
    raw = [(m.group(), m.start(), m.end()) for m in TOKEN_RE.finditer(text)]
    out: list[Token] = []
    i = 0
    while i < len(raw):
        for n in (3, 2):
            if i + n > len(raw):
                continue
            words = tuple(w.lower() for w, _, _ in raw[i : i + n])
            gaps_ok = all(
                re.fullmatch(r"\s*-?\s*", text[raw[j][2] : raw[j + 1][1]])
                for j in range(i, i + n - 1)
            )
            if words in MULTI_ALIASES and gaps_ok:
                s, e = raw[i][1], raw[i + n - 1][2]
                out.append(Token(text[s:e], MULTI_ALIASES[words], s, e))
                i += n
                break
        else:
            w, s, e = raw[i]
            out.append(Token(w, word_key(w), s, e))
            i += 1
    return out


def content_keys(text: str) -> tuple[str, ...]:
    """Keys of a phrase's content words (articles and function words dropped), in order."""
    return tuple(t.key for t in tokenize(text) if t.lower not in FUNCTION_WORDS)


def split_parts(answer: str) -> list[str]:
    """Parts of a list answer: "upper left and lower right" -> ["upper left", "lower right"]."""
    parts = [p.strip() for p in re.split(r",|;|\band\b", answer) if p.strip()]
    return [p for p in parts if content_keys(p)] or [answer.strip()]


def category_of(question_type: str) -> str:
    """Lexicon category of a record's ``question_type`` ("PRES, POS" -> the first, "presence")."""
    first = re.split(r"[,/]", question_type.strip().lower())[0].strip()
    return QTYPE_CATEGORY.get(first, first or "other")


@dataclass(frozen=True)
class Phrase:
    """An answer of the vocabulary: display text (whitespace normalised) and its content keys."""

    text: str
    keys: tuple[str, ...]


class Lexicon:
    """Key -> categories tags and the per-category answer vocabulary (built-in + dataset)."""

    def __init__(self) -> None:
        self._tags: dict[str, set[str]] = {}
        self._vocab: dict[str, dict[tuple[str, ...], Phrase]] = {}
        self._builtin_phrases: dict[str, set[tuple[str, ...]]] = {}
        for cat, keys in BUILTIN.items():
            for k in sorted(keys):
                self.add(cat, DISPLAY.get(k, k), builtin=True)

    def add(self, category: str, phrase: str, *, builtin: bool = False) -> None:
        """Add a phrase (an answer) to a category: tags its content keys, extends the vocabulary.
        List answers ("upper left and lower right") add each part. The first dataset spelling of
        a phrase replaces the built-in one ("Liver" over "liver")."""
        for part in split_parts(phrase):
            keys = content_keys(part)
            if not keys:
                continue
            for k in keys:
                self._tags.setdefault(k, set()).add(category)
            text = " ".join(part.split())
            vocab = self._vocab.setdefault(category, {})
            if keys not in vocab or (not builtin and keys in self._builtin_phrases[category]):
                vocab[keys] = Phrase(text, keys)
                if builtin:
                    self._builtin_phrases.setdefault(category, set()).add(keys)
                else:
                    self._builtin_phrases.setdefault(category, set()).discard(keys)

    @classmethod
    def from_records(cls, records: Iterable[VQARecord]) -> Lexicon:
        """The built-in lexicon extended with every non-yes/no, non-report answer of the records
        under its question type's category (the dataset's own answer vocabulary)."""
        lex = cls()
        for r in records:
            if r.answer_type == "report" or content_keys(r.answer) in {("yes",), ("no",)}:
                continue
            lex.add(category_of(r.question_type), r.answer)
        return lex

    def tags(self, word_or_key: str) -> frozenset[str]:
        """Categories of a word (given as a surface word or a key)."""
        key = word_or_key if word_or_key in self._tags else word_key(word_or_key)
        tags = set(self._tags.get(key, ()))
        if is_number(key):
            tags.add("count")
        return frozenset(tags)

    def vocabulary(self, category: str, *, dataset_only: bool = False) -> list[Phrase]:
        """The answer phrases of a category, in a stable (sorted) order; ``dataset_only`` leaves
        out the built-in words the dataset's answers never used."""
        builtin = self._builtin_phrases.get(category, set()) if dataset_only else set()
        phrases = [p for k, p in self._vocab.get(category, {}).items() if k not in builtin]
        return sorted(phrases, key=lambda p: p.keys)

    def is_finding(self, key: str) -> bool:
        """A finding noun (lesion, nodule, effusion, ...): built in, or a word of the dataset's
        abnormality answers that is not an attribute, organ, number or function word."""
        if key in BUILTIN["abnormality"]:
            return True
        tags = self._tags.get(key, set())
        return (
            "abnormality" in tags
            and not tags & _ATTRIBUTE_CATEGORIES
            and key not in BUILTIN["organ"]
            and key not in SOFT_WORDS
            and key not in FUNCTION_WORDS
            and key not in {"none", "no", "yes"}
            and not is_number(key)
        )

    def is_noun(self, key: str) -> bool:
        """A finding or an organ (the head of a noun phrase, for a/an/no agreement)."""
        return self.is_finding(key) or key in BUILTIN["organ"]

    def group(self, category: str, answer_keys: Sequence[str]) -> frozenset[str]:
        """Categories whose words may carry the answer to a question of ``category``: the
        category's group plus the specific (non catch-all) categories of the answer's words."""
        group = set(CATEGORY_GROUPS.get(category, {category}))
        for k in answer_keys:
            group |= self.tags(k) - _CATCH_ALL
        return frozenset(group)


def antonym(surface: str) -> str | None:
    """The plausible wrong alternative of a word, in the same word family (lowercase), or None.

    hyper/hypo and supra/infra swap their prefix (hyperattenuating -> hypoattenuating); counts:
    0 -> 1, 1 -> 2, 2 -> 1, n -> n - 1, written as digits or words like the input; ordinals
    1st -> 2nd, 4th -> 3rd."""
    low = surface.lower().replace("’", "'")
    if low in ANTONYMS:
        return ANTONYMS[low]
    for a, b in (("hyper", "hypo"), ("hypo", "hyper"), ("supra", "infra"), ("infra", "supra")):
        if low.startswith(a) and (a in {"supra", "infra"} or low[len(a) :] in _HYPER_SUFFIXES):
            return b + low[len(a) :]
    m = _ORDINAL_RE.fullmatch(low)
    if m:
        n = int(m.group(1))
        n = n + 1 if n == 1 else n - 1
        return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n if n < 20 else n % 10, 'th') }"
    key = word_key(low)
    if is_number(key) and "." not in key:
        n = int(key)
        m = {0: 1, 1: 2, 2: 1}.get(n, n - 1)
        return str(m) if low.isdigit() else DIGIT_WORDS.get(m, str(m))
    return ANTONYMS.get(key)


def number_surface(value: int, like: str) -> str:
    """Write a count the way ``like`` is written: digits for digits, else a number word."""
    return str(value) if like.isdigit() else DIGIT_WORDS.get(value, str(value))


def article_for(word: str) -> str:
    """'a' or 'an' before ``word`` by its first sound: acronyms by letter name (an MRI, a CT,
    an X-ray), digits by number name (an 8, an 11), words by vowel letter (a unit, an hour)."""
    w = word.strip()
    if not w:
        return "a"
    head = re.split(r"[\s-]", w)[0]
    if head.isdigit():
        return "an" if head.startswith("8") or head in {"11", "18"} else "a"
    if (head.isupper() and len(head) <= 5) or head.lower() in DISPLAY or len(head) == 1:
        return "an" if head[0].upper() in "AEFHILMNORSX" else "a"
    low = head.lower()
    if low.startswith(("uni", "use", "usu", "one", "eu", "ure")):
        return "a"
    if low.startswith(("hour", "honest", "honor")):
        return "an"
    return "an" if low[0] in "aeiou" else "a"


def match_case(template: str, replacement: str) -> str:
    """Write ``replacement`` in the case style of the word it replaces.

    Lowercase context -> lowercase (but an upper-case acronym of the replacement, "PA", is
    kept); a capitalised word -> capitalised first word; an upper-case
    non-acronym word -> upper case. Acronyms (CT, MRI, T2) keep their display form unless the
    context is lowercase ("an mri" stays lowercase)."""
    words = replacement.split(" ")
    lower_ctx = template == template.lower()
    shout = template.isupper() and len(template) > 1 and word_key(template) not in DISPLAY
    out = []
    for i, w in enumerate(words):
        k = word_key(w)
        if lower_ctx:
            out.append(w if w.isupper() and len(w) > 1 else w.lower())
        elif k in DISPLAY and w.lower() in {k, DISPLAY[k].lower()}:
            out.append(DISPLAY[k])
        elif shout:
            out.append(w.upper())
        elif i == 0 and template[:1].isupper():
            out.append(w[:1].upper() + w[1:].lower())
        else:
            out.append(w if w.isupper() and len(w) > 1 else w.lower())
    return " ".join(out)
