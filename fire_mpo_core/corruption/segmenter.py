"""Prompted lesion segmenters: the interface, a registry, a classical CPU segmenter and the
(question, answer) -> prompt rule.

In the paper an LLM turns a QA pair into a short segmentation prompt (or "none") and a segmenter
finds that region, inside which the image is then corrupted (docs/design.md section 1). Here::

    from fire_mpo_core.corruption.segmenter import get_segmenter, prompt_from_qa
    prompt = prompt_from_qa("Where is the lesion?", "upper left")   # "lesion in the upper left"
    seg = get_segmenter("classical")
    mask = seg.segment(image, prompt)        # bool HxW, or None when nothing is found

Interface: anything with ``segment(image, prompt) -> bool HxW | None`` is a :class:`Segmenter`
(a structural Protocol, no base class needed). `image` is uint8 HxW or HxWx3; `prompt` is free text
or None (None: find the most salient lesion anywhere). Return None when nothing is found; the
batch then falls back to whole-image noise (sigma 12), as the paper does.

Plugging in a GPU segmenter (a SAM-family model such as MedSAM, SAM 2 with a text grounder such as
Grounding DINO, or BiomedParse): write a class with that one method that loads its weights lazily
on first use (so that constructing it is cheap and picklable), maps the prompt to boxes/points
with its grounder, and returns the union of the masks above its score threshold or None; then add
one line to :data:`SEGMENTERS` below, e.g. ``"medsam": MedSamSegmenter``, with its options
(checkpoint path, thresholds) in ``CorruptConfig.segmenter_options``. Batch workers build
segmenters by name through :func:`get_segmenter`, once per process; a segmenter added at run time
with :func:`register_segmenter` exists only in processes that ran that call, so use it with the
thread pool or ``num_workers=0`` (the right choice for one GPU anyway: one copy of the model).
No such model is bundled: the machines this project runs on by default have no GPU and no model
hub.

The embedded :class:`ClassicalSegmenter` (scikit-image / OpenCV) is built for SynthLesion-like
scans: grey 64-128 px images with a body on a dark background and bright ("hyperdense") or dark
("hypodense") blobs inside it. It reads the prompt's location words in the radiological convention
(the patient's left is the image's right), its intensity words (hyperdense / hypodense and
synonyms), and finds the most salient blob of local contrast against a median background.

:func:`prompt_from_qa` is the paper's LLM step as deterministic rules: it keeps the finding,
location, intensity and organ words of a QA pair and returns None when the pair says there is no
finding or has no lesion or location content (modality, plane, counts of zero, ...). An LLM can
replace it later behind the same signature.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import apply_hysteresis_threshold, threshold_otsu

from fire_mpo_core.corruption.ops import validate_image


@runtime_checkable
class Segmenter(Protocol):
    """A prompted segmenter: bool HxW mask of the region the prompt names, or None."""

    def segment(self, image: np.ndarray, prompt: str | None) -> np.ndarray | None:
        """image: uint8 HxW or HxWx3; prompt: free text or None. Returns bool HxW or None."""
        ...


# --------------------------------------------------------------------------------------------
# Prompt words
# --------------------------------------------------------------------------------------------

_UPPER = {"upper", "superior", "top", "apical", "apex", "apices", "cranial"}
_LOWER = {"lower", "inferior", "bottom", "basal", "base", "bases", "caudal"}
_CENTRAL = {"central", "centre", "center", "middle", "midline"}
_BRIGHT = {
    "hyperdense", "hyperintense", "hyperechoic", "bright", "enhancing", "calcified",
    "calcification", "opacity", "opacities", "dense",
}  # fmt: skip
_DARK = {
    "hypodense", "hypointense", "hypoechoic", "dark", "lucent", "lucency", "radiolucent",
    "hypoattenuating",
}  # fmt: skip


@dataclass(frozen=True)
class PromptLocation:
    """What a prompt says about where and what to look for (patient frame for `side`)."""

    vertical: str | None = None  # "upper" | "lower"
    side: str | None = None  # patient side: "left" | "right"
    central: bool = False
    polarity: int = 0  # +1 bright, -1 dark, 0 either


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def parse_prompt(prompt: str | None) -> PromptLocation:
    """Location and intensity words of a prompt; contradictory pairs cancel to "unknown"."""
    if not prompt:
        return PromptLocation()
    w = set(_words(prompt))
    up, low = bool(w & _UPPER), bool(w & _LOWER)
    left, right = "left" in w, "right" in w
    bilateral = bool(w & {"bilateral", "both"})
    bright, dark = bool(w & _BRIGHT), bool(w & _DARK)
    return PromptLocation(
        vertical="upper" if up and not low else "lower" if low and not up else None,
        side=None if bilateral or left == right else ("left" if left else "right"),
        central=bool(w & _CENTRAL),
        polarity=1 if bright and not dark else -1 if dark and not bright else 0,
    )


def region_contains(loc: PromptLocation, cy: float, cx: float, h: int, w: int) -> bool:
    """Whether the point (row cy, col cx) of an h x w image lies where `loc` says.

    Radiological convention: the patient's left is on the image's right, so "left" means
    cx >= w / 2 and "right" means cx < w / 2; "upper" is the top half (cy < h / 2).
    """
    if loc.vertical == "upper" and cy >= h / 2:
        return False
    if loc.vertical == "lower" and cy < h / 2:
        return False
    if loc.side == "left" and cx < w / 2:
        return False
    if loc.side == "right" and cx >= w / 2:
        return False
    return not (
        loc.central
        and loc.side is None
        and loc.vertical is None
        and (abs(cy - h / 2) > h / 4 or abs(cx - w / 2) > w / 4)
    )


# --------------------------------------------------------------------------------------------
# The classical segmenter
# --------------------------------------------------------------------------------------------


def _to_grey01(image: np.ndarray) -> np.ndarray:
    """float32 HxW in [0, 1]; RGB reduced with ITU-R 601 luma weights."""
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    return image.astype(np.float32) / 255.0


class ClassicalSegmenter:
    """Local-contrast blob finder for SynthLesion-like scans (see the module docstring).

    Steps, at a working resolution whose long side is at most `work_size` px (the input is
    downscaled with area averaging when larger; the mask is scaled back):
      1. Body = not the dark background that touches the image border (Otsu threshold on the
         image smoothed at 1 px), holes filled, eroded by 3 px so the body/air edge cannot pass
         for a lesion; the whole image when there is no such background.
      2. Background b = median over a window of `bg_fraction` of the short side, with the outside
         of the body filled by the body's median. A median ignores a blob smaller than half its
         window, so b follows the tissue, not the lesion.
      3. Contrast c_s = G_s * x - b at each smoothing scale s in `scales` (px at 64 px, scaled
         with the image), standardised by its robust noise, z_s = c_s / (1.4826 MAD(c_s)). The
         larger scales are matched filters for larger blobs on a textured background.
      4. Candidates: hysteresis regions of max_s(+z_s) (bright) and/or max_s(-z_s) (dark), low
         `low_sigma`, high `k_sigma`; each is cut to its half-maximum of the fine-scale contrast
         (the blob's edge) and kept if that peak is at least `min_contrast` (0-1 scale) and its
         area is in [`min_area_px`, `max_area_fraction` * body].
      5. Among those whose centroid lies in the prompt's region, the most salient wins:
         score = sum over the blob of |c_1|.
    Returns the chosen blob as bool HxW at the input's resolution, or None.

    Measured on 120 generated scans (64/96/128 px; one disc of radius 5-14% of the side and
    contrast +-35-70 grey levels on texture of std 3-12, plus a stronger distractor in another
    quadrant; prompt "lesion in the <quadrant>"): IoU > 0.5 on 118, mean IoU 0.89; on 60
    lesion-free scans prompted "lesion" it returned a (false) blob 3 times.
    """

    def __init__(
        self,
        work_size: int = 128,
        scales: tuple[float, ...] = (1.0, 2.0, 3.0),
        bg_fraction: float = 0.5,
        k_sigma: float = 4.0,
        low_sigma: float = 2.0,
        min_contrast: float = 0.08,
        min_area_px: int = 4,
        max_area_fraction: float = 0.25,
    ) -> None:
        if work_size < 16:
            raise ValueError(f"work_size must be >= 16, got {work_size}")
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive, got {scales}")
        if not 0 < low_sigma <= k_sigma:
            raise ValueError(f"need 0 < low_sigma <= k_sigma, got {low_sigma}, {k_sigma}")
        self.work_size = work_size
        self.scales = tuple(float(x) for x in scales)
        self.bg_fraction = bg_fraction
        self.k_sigma = k_sigma
        self.low_sigma = low_sigma
        self.min_contrast = min_contrast
        self.min_area_px = min_area_px
        self.max_area_fraction = max_area_fraction

    @staticmethod
    def body_mask(s: np.ndarray) -> np.ndarray:
        """bool mask of the body in a smoothed [0, 1] image (step 1)."""
        if float(s.max() - s.min()) < 1e-6:
            return np.ones(s.shape, dtype=bool)
        dark = s <= threshold_otsu(s)
        labels, _ = ndi.label(dark)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        air = np.isin(labels, border[border > 0])
        body = ndi.binary_fill_holes(~air)
        # No dark background (a texture filling the frame) or a sliver of body: use the image.
        if air.mean() < 0.05 or body.mean() < 0.1:
            return np.ones(s.shape, dtype=bool)
        return cv2.erode(body.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)

    def background(self, s: np.ndarray, body: np.ndarray) -> np.ndarray:
        """Median background of a [0, 1] image inside the body (step 2), float32 HxW."""
        filled = s.copy()
        filled[~body] = np.median(s[body])
        k = max(3, int(self.bg_fraction * min(s.shape)) | 1)
        # cv2.medianBlur takes any odd window on uint8 only; 1/255 quantisation is far below the
        # contrasts that matter.
        bg = cv2.medianBlur(np.clip(np.rint(filled * 255), 0, 255).astype(np.uint8), k)
        return bg.astype(np.float32) / 255.0

    def segment(self, image: np.ndarray, prompt: str | None) -> np.ndarray | None:
        """bool HxW of the most salient blob in the region the prompt names, or None."""
        image = validate_image(image)
        h, w = image.shape[:2]
        grey = _to_grey01(image)
        if max(h, w) > self.work_size:
            f = self.work_size / max(h, w)
            size = (max(1, round(w * f)), max(1, round(h * f)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        if float(grey.max() - grey.min()) < 2.0 / 255.0:
            return None  # flat: nothing can stand out
        gh, gw = grey.shape
        px = max(1.0, min(gh, gw) / 64.0)  # scales are given for a 64 px image
        fine = cv2.GaussianBlur(grey, (0, 0), self.scales[0] * px)
        body = self.body_mask(fine)
        bg = self.background(fine, body)
        c_fine = fine - bg
        zs = []
        for sc in self.scales:
            c = (fine if sc == self.scales[0] else cv2.GaussianBlur(grey, (0, 0), sc * px)) - bg
            noise = 1.4826 * float(np.median(np.abs(c[body] - np.median(c[body]))))
            zs.append(c / max(noise, 1.0 / 255.0))
        z = np.stack(zs)
        loc = parse_prompt(prompt)
        max_area = self.max_area_fraction * float(body.sum())
        best: tuple[float, np.ndarray] | None = None
        for polarity in (1, -1):
            if loc.polarity and polarity != loc.polarity:
                continue
            zp = (polarity * z).max(axis=0)
            zp[~body] = 0.0
            cand = apply_hysteresis_threshold(zp, self.low_sigma, self.k_sigma)
            labels, n = ndi.label(cand)
            pc = polarity * c_fine
            for lab in range(1, n + 1):
                comp = labels == lab
                peak = float(np.percentile(pc[comp], 90))
                if peak < self.min_contrast:
                    continue
                blob = comp & (pc >= 0.5 * peak)
                parts, k = ndi.label(blob)
                if k > 1:  # keep the main piece of the half-maximum cut
                    blob = parts == 1 + int(np.argmax(np.bincount(parts[blob])[1:]))
                area = int(blob.sum())
                if not self.min_area_px <= area <= max_area:
                    continue
                ys, xs = np.nonzero(blob)
                # Pixel centres are at +0.5 in the region test's continuous coordinates.
                if not region_contains(loc, ys.mean() + 0.5, xs.mean() + 0.5, gh, gw):
                    continue
                score = float(pc[blob].sum())
                if best is None or score > best[0]:
                    best = (score, blob)
        if best is None:
            return None
        blob = best[1]
        if blob.shape != (h, w):
            up = cv2.resize(blob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
            blob = up > 0.5
            if not blob.any():
                return None
        return blob


#: Segmenter registry: name -> factory (called with keyword options). One line per segmenter.
SEGMENTERS: dict[str, Callable[..., Segmenter]] = {
    "classical": ClassicalSegmenter,
}


def register_segmenter(name: str, factory: Callable[..., Segmenter]) -> None:
    """Add a segmenter factory under `name` (refuses to silently replace another one)."""
    if name in SEGMENTERS and SEGMENTERS[name] is not factory:
        raise ValueError(f"segmenter {name!r} is already registered")
    SEGMENTERS[name] = factory


def get_segmenter(name: str, **options: object) -> Segmenter:
    """Build the registered segmenter `name` with `options`; unknown name -> ValueError."""
    try:
        factory = SEGMENTERS[name]
    except KeyError:
        raise ValueError(
            f"unknown segmenter {name!r}; known segmenters: {', '.join(sorted(SEGMENTERS))}"
        ) from None
    seg = factory(**options)
    if not isinstance(seg, Segmenter):
        raise TypeError(f"segmenter {name!r} has no segment(image, prompt) method")
    return seg


# --------------------------------------------------------------------------------------------
# (question, answer) -> prompt
# --------------------------------------------------------------------------------------------

# Findings a segmenter can look for, singular form first where a plural maps to it.
_FINDINGS = {
    "lesion": "lesion", "lesions": "lesion", "mass": "mass", "masses": "mass",
    "nodule": "nodule", "nodules": "nodule", "tumor": "tumor", "tumors": "tumor",
    "tumour": "tumor", "tumours": "tumor", "cyst": "cyst", "cysts": "cyst",
    "opacity": "opacity", "opacities": "opacity", "effusion": "effusion",
    "pneumothorax": "pneumothorax", "fracture": "fracture", "fractures": "fracture",
    "abscess": "abscess", "hemorrhage": "hemorrhage", "haemorrhage": "hemorrhage",
    "hematoma": "hematoma", "infarct": "infarct", "infarction": "infarct",
    "metastasis": "metastasis", "metastases": "metastasis", "metastatic": "metastasis",
    "aneurysm": "aneurysm", "consolidation": "consolidation", "edema": "edema",
    "oedema": "edema", "thickening": "thickening", "stone": "stone", "stones": "stone",
    "calculus": "stone", "calculi": "stone", "enlargement": "enlargement",
    "enlarged": "enlargement", "dilation": "dilation", "dilated": "dilation",
    "obstruction": "obstruction", "infiltrate": "infiltrate", "atelectasis": "atelectasis",
    "calcification": "calcification", "calcified": "calcification", "tumorous": "tumor",
    "air": "free air",
}  # fmt: skip
# Intensity adjectives: they make a QA pair about a lesion without naming one.
_INTENSITY_ADJ = {
    "hyperdense", "hypodense", "hyperintense", "hypointense", "hyperechoic", "hypoechoic",
}  # fmt: skip
_GENERIC = {"abnormal", "abnormality", "abnormalities", "finding", "findings", "pathology"}
# Organ words and adjectives -> the organ's name in the prompt.
_ORGANS = {
    "lung": "lung", "lungs": "lung", "pulmonary": "lung", "liver": "liver", "hepatic": "liver",
    "spleen": "spleen", "splenic": "spleen", "kidney": "kidney", "kidneys": "kidney",
    "renal": "kidney", "brain": "brain", "cerebral": "brain", "heart": "heart",
    "cardiac": "heart", "pancreas": "pancreas", "pancreatic": "pancreas", "bowel": "bowel",
    "colon": "colon", "stomach": "stomach", "breast": "breast", "bladder": "bladder",
    "gallbladder": "gallbladder", "adrenal": "adrenal gland", "aorta": "aorta",
    "aortic": "aorta", "thyroid": "thyroid", "prostate": "prostate", "uterus": "uterus",
    "ovary": "ovary", "bone": "bone", "spine": "spine", "chest": "chest", "abdomen": "abdomen",
}  # fmt: skip
_NEGATIVE_ANSWERS = {
    "no", "none", "normal", "absent", "negative", "0", "zero", "nothing", "unremarkable",
    "not seen", "no lesion", "no lesions", "no abnormality", "no finding", "no findings",
}  # fmt: skip
_NON_SPATIAL = {"modality", "plane", "weighted", "weighting", "sequence", "contrast", "view"}


def prompt_from_qa(question: str, answer: str) -> str | None:
    """A short segmentation prompt for a QA pair, or None when there is nothing to segment.

    Rules, in order: a pair about the acquisition (modality, plane, sequence, ...) -> None; a
    yes/no answer decides whether the asked-about finding is present ("Is X normal?" flips it);
    a negative or zero answer -> None; otherwise the finding, location (upper / lower / left /
    right / central, patient frame, kept as words), intensity and organ words are collected, from
    the answer first and from the question unless it is an either/or question; with none of
    them -> None. Examples:

        ("Where is the lesion?", "upper left")            -> "lesion in the upper left"
        ("Is the mass hyperdense or hypodense?", "hypodense") -> "hypodense mass"
        ("Is there a lesion?", "no")                       -> None
        ("What modality is this?", "CT")                   -> None
    """
    qw, aw = _words(question or ""), _words(answer or "")
    a_text = " ".join(aw)
    if not aw:
        return None
    spatial = (
        set(_FINDINGS) | _UPPER | _LOWER | _BRIGHT | _DARK | _INTENSITY_ADJ | {"left", "right"}
    )
    if set(qw) & _NON_SPATIAL and not set(aw) & spatial:
        return None
    about_normal = bool(set(qw) & {"normal", "healthy", "unremarkable"})
    if aw[0] in ("yes", "no") and len(aw) <= 2:
        present = (aw[0] == "yes") != about_normal
        if not present:
            return None
        use_question = True
    else:
        if a_text in _NEGATIVE_ANSWERS or aw[0] in ("no", "without") or a_text.startswith("not "):
            return None
        # Either/or questions name alternatives, not facts: only the answer says which holds.
        either_or = "or" in qw
        use_question = not either_or
    # Each attribute from the answer when it has one, else from the question (if allowed).
    a_loc = parse_prompt(" ".join(aw))
    q_loc = parse_prompt(" ".join(qw)) if use_question else PromptLocation()
    loc = PromptLocation(
        vertical=a_loc.vertical or q_loc.vertical,
        side=a_loc.side or q_loc.side,
        central=a_loc.central or (q_loc.central and not (a_loc.vertical or a_loc.side)),
        polarity=a_loc.polarity or q_loc.polarity,
    )
    # The finding noun: from the answer, else from the question (either/or questions included:
    # "Is the lesion hyperdense or hypodense?" is still about a lesion).
    nouns = [_FINDINGS[w] for w in aw + qw if w in _FINDINGS and w not in _INTENSITY_ADJ]
    finding = nouns[0] if nouns else None
    organ = next((_ORGANS[w] for w in aw + qw if w in _ORGANS), None)
    generic = any(w in _GENERIC for w in aw + qw) or about_normal
    has_location = loc.vertical is not None or loc.side is not None or loc.central
    if finding is None:
        if has_location or loc.polarity or any(w in _INTENSITY_ADJ for w in aw + qw):
            finding = "lesion"
        elif generic and organ:
            finding = "abnormality"
        else:
            return None
    parts = []
    # "opacity" already says bright; "hyperdense opacity" would be redundant.
    if loc.polarity and finding != "opacity":
        parts.append("hyperdense" if loc.polarity > 0 else "hypodense")
    parts.append(finding)
    if loc.vertical and loc.side:
        parts.append(f"in the {loc.vertical} {loc.side}")
    elif loc.side:
        parts.append(f"on the {loc.side} side")
    elif loc.vertical:
        parts.append(f"in the {loc.vertical} half")
    elif loc.central:
        parts.append("in the center")
    if organ:
        parts.append(f"of the {organ}")
    return " ".join(parts)
