"""The dashboard report's pieces on hand-made stage folders (fire_mpo_core/report.py)."""

from __future__ import annotations

import base64
import json
import re

import cv2
import numpy as np

from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.report import cycle_report, mark_spans, metrics_table
from fire_mpo_core.store import DATA, write_jsonl


def test_mark_spans_wraps_exactly_the_spans():
    text = "lesion in the left lung"
    # [14, 18) = "left"; a span with a trailing space keeps the space outside the markers.
    assert mark_spans(text, [(14, 18)], "**") == "lesion in the **left** lung"
    assert mark_spans(text, [(14, 19)], "~~") == "lesion in the ~~left~~ lung"
    assert mark_spans("a*b yes", [(4, 7)], "**") == "a\\*b **yes**"


def test_metrics_table_one_row_per_round(tmp_path):
    evals = {}
    for k, acc in ((0, 0.5), (1, 0.625)):
        d = tmp_path / f"e{k}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"closed_accuracy": acc, "n_closed": 8}))
        evals[k] = d
    table = metrics_table(evals).splitlines()
    assert table[0] == "| round | policy | closed_accuracy |"
    assert table[2] == "| 0 | SFT base | 0.500 |"
    assert table[3] == "| 1 | round 1 | 0.625 |"


def test_report_embeds_triptych_and_highlights_spans(tmp_path):
    root, corrupt = tmp_path / "prepare", tmp_path / "corrupt"
    (root / "images").mkdir(parents=True)
    (corrupt / "images").mkdir(parents=True)
    img = np.full((64, 48), 100, np.uint8)
    mask = np.zeros_like(img)
    mask[10:20, 10:20] = 255
    cv2.imwrite(str(root / "images" / "a.png"), img)
    cv2.imwrite(str(root / "images" / "a_mask.png"), mask)
    cv2.imwrite(str(corrupt / "images" / "a.png"), img // 2)
    pair = PreferencePair(
        id="r1#0",
        record_id="r1",
        image="images/a.png",
        mask="images/a_mask.png",
        question="Where is the lesion?",
        answer_type="open",
        chosen="left lung",
        rejected="right lung",
        chosen_spans=[(0, 4)],
        rejected_spans=[(0, 5)],
        verdict="incorrect",
        corrupted_image="images/a.png",
    )
    write_jsonl(corrupt / DATA, [pair])
    md = cycle_report("demo", {}, corrupt, root)
    assert "**left** lung" in md and "~~right~~ lung" in md
    uri = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", md).group(1)
    png = cv2.imdecode(np.frombuffer(base64.b64decode(uri), np.uint8), cv2.IMREAD_GRAYSCALE)
    # Three 96x128 thumbnails (the longer side scaled to 128) and two 4-px gaps.
    assert png.shape == (128, 3 * 96 + 2 * 4)
    # The mask panel is white exactly on the (scaled) lesion square.
    panel = png[:, 100:196]
    assert panel[30, 30] == 255 and panel[5, 5] == 0
    # The corrupted panel shows v' (half the original intensity).
    assert png[64, 200 + 10] == 50 and png[64, 10] == 100


def test_stage_table_counts_rejects_by_reason_kind(tmp_path):
    from tasks.common import rejects_by_reason

    lines = [
        {"id": "a#0", "reason": "no_answer_found: no answer of the question's kind"},
        {"id": "b#0", "reason": "no_answer_found: gibberish"},
        {"id": "c", "reason": "image images/c.png: truncated file"},
        {"id": "d", "reason": "duplicate id"},
    ]
    path = tmp_path / "rejects.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    got = rejects_by_reason(path)
    assert got == {"no_answer_found": 2, "image images/c.png": 1, "duplicate id": 1}
    assert rejects_by_reason(tmp_path / "missing.jsonl") == {}
