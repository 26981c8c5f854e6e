"""Lesion-mask image corruption for FiRe-MPO's visual-contrastive term (the `corrupt` stage).

The paper corrupts the lesion so that the preference between y+ and y- must reverse under the
corrupted image v' (docs/design.md section 1). This package holds the library half of the stage:

- :mod:`.ops`       `corrupt(image, mask, kind, seed, **params)`, the stable contract of
                    docs/design.md section 5, and the registry of kinds (noise, inpaint, blur,
                    black, crop);
- :mod:`.masks`     mask sources: mask files, COCO RLE (own decoder), boxes, resizing;
- :mod:`.segmenter` the prompted-segmenter Protocol and registry, a classical CPU segmenter and
                    the (question, answer) -> prompt rule;
- :mod:`.quality`   per-image quality numbers (changed fractions, SSIM inside the mask);
- :mod:`.batch`     the paper's fallbacks per record, `CorruptConfig` and the parallel batch.

Usage::

    from fire_mpo_core.corruption import corrupt, CorruptConfig, CorruptItem, corrupt_many
    v_prime = corrupt(image, mask, "noise", seed=0)
    results = corrupt_many([CorruptItem(id="r1", image=img, mask=m, prompt=None)], CorruptConfig())
"""

from fire_mpo_core.corruption.batch import (
    CorruptItem,
    CorruptResult,
    corrupt_for_record,
    corrupt_many,
    derive_seed,
    iter_corrupt,
    load_image,
    make_executor,
)
from fire_mpo_core.corruption.config import CorruptConfig
from fire_mpo_core.corruption.masks import (
    binarize,
    box_mask,
    decode_rle,
    encode_rle,
    fit_mask,
    load_mask,
    mask_from_source,
    resize_mask,
)
from fire_mpo_core.corruption.ops import (
    CHANGES_OUTSIDE_MASK,
    CORRUPTIONS,
    SIGMA_MASK,
    SIGMA_WHOLE,
    corrupt,
)
from fire_mpo_core.corruption.quality import CorruptionQuality, corruption_quality
from fire_mpo_core.corruption.segmenter import (
    SEGMENTERS,
    ClassicalSegmenter,
    Segmenter,
    get_segmenter,
    prompt_from_qa,
    register_segmenter,
)

__all__ = [
    "CHANGES_OUTSIDE_MASK",
    "CORRUPTIONS",
    "SEGMENTERS",
    "SIGMA_MASK",
    "SIGMA_WHOLE",
    "ClassicalSegmenter",
    "CorruptConfig",
    "CorruptItem",
    "CorruptResult",
    "CorruptionQuality",
    "Segmenter",
    "binarize",
    "box_mask",
    "corrupt",
    "corrupt_for_record",
    "corrupt_many",
    "corruption_quality",
    "decode_rle",
    "derive_seed",
    "encode_rle",
    "fit_mask",
    "get_segmenter",
    "iter_corrupt",
    "load_image",
    "load_mask",
    "make_executor",
    "mask_from_source",
    "prompt_from_qa",
    "register_segmenter",
    "resize_mask",
]
