"""Evaluation protocols of Vita-CLIP and its peers: classification with several views, zero-shot splits, retrieval.

Metrics are percentages (0-100), as the paper reports them.

Classification: each video is decoded as ``temporal_views x spatial_views`` clips (the official default is 3 x 1:
three dense clips spread over the video, one centre crop); the softmax over the label logits is averaged over views.

Zero-shot protocols (the user brings the videos and the split files):
    HMDB51 and UCF101: the test list of each of the three official splits is scored against all 51 / 101 classes
    (packaged as the label sets ``hmdb51`` and ``ucf101``); the result is the mean and standard deviation over the
    three splits.
    Kinetics-600: the 220 classes of Kinetics-600 that are not in Kinetics-400 are split into three random subsets
    of 160 classes (seeded); the videos of each subset are scored against that subset's 160 names; mean and
    standard deviation over the three. No Kinetics-600 class list ships with vitaclip: pass the official one.

Retrieval (MSR-VTT style): recall@1/5/10, median and mean rank, text-to-video and video-to-text.

Reference numbers from the paper for the released Vita-CLIP-B (8 frames): Kinetics-400 supervised top-1 81.8;
zero-shot HMDB51 48.6 +/- 0.6, UCF101 75.0 +/- 0.6, Kinetics-600 67.4 +/- 0.5.
"""

from __future__ import annotations

from vitaclip.evaluation.inference import (
    ViewSpec,
    decode_views,
    decode_views_safely,
    evaluate_classification,
    frame_averaging_baseline,
    parse_views,
    spatial_crops,
    video_embeddings,
    video_logits,
)
from vitaclip.evaluation.metrics import (
    average_view_probabilities,
    classification_metrics,
    confusion_matrix,
    retrieval_metrics,
)
from vitaclip.evaluation.plots import (
    save_confusion_png,
    save_curves_png,
    save_recall_png,
)
from vitaclip.evaluation.protocols import (
    CONFUSION_MAX_CLASSES,
    K600_NOVEL_CLASSES,
    K600_SUBSET_SIZE,
    PACKAGED_CLASS_LISTS,
    PAPER_REFERENCE,
    kinetics600_novel_classes,
    kinetics600_subsets,
    load_class_list,
    mean_std,
    normalize_class_name,
    read_hmdb51_split,
    read_ucf101_split,
    restrict_to_classes,
)

__all__ = [
    "CONFUSION_MAX_CLASSES",
    "K600_NOVEL_CLASSES",
    "K600_SUBSET_SIZE",
    "PACKAGED_CLASS_LISTS",
    "PAPER_REFERENCE",
    "ViewSpec",
    "average_view_probabilities",
    "classification_metrics",
    "confusion_matrix",
    "decode_views",
    "decode_views_safely",
    "evaluate_classification",
    "frame_averaging_baseline",
    "kinetics600_novel_classes",
    "kinetics600_subsets",
    "load_class_list",
    "mean_std",
    "normalize_class_name",
    "parse_views",
    "read_hmdb51_split",
    "read_ucf101_split",
    "restrict_to_classes",
    "retrieval_metrics",
    "save_confusion_png",
    "save_curves_png",
    "save_recall_png",
    "spatial_crops",
    "video_embeddings",
    "video_logits",
]
