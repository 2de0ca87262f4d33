"""Advice for weights that do not fit a model whose class count the CLI took from the data."""

from __future__ import annotations

from tbd.engine.checkpoint import UnreadableWeightsError, WeightsMismatchError, class_count_of_weights


def mismatch_advice(err: WeightsMismatchError, what: str, num_classes: int, dataset: str) -> str:
    """What the user can do about ``err``: the CLI sets the class count from the data, so passing
    "the config these weights were trained with" does not help when only the class count differs."""
    if isinstance(err, UnreadableWeightsError) or not err.shapes:
        return str(err)
    trained_for = None if err.missing else class_count_of_weights(err.shapes, num_classes)
    if trained_for is None:
        return (
            f"{what} weights {err.path} do not fit its config: {err.detail}. Pass the config these "
            "weights were trained with (backbone depth and head must match; the class count is set "
            f"from the data, {num_classes} for {dataset})"
        )
    return (
        f"{what} weights {err.path} were trained for {trained_for} classes, but {dataset} has "
        f"{num_classes} (e.g. {err.shapes[0][0]}: {err.shapes[0][1]} vs {err.shapes[0][2]}). tbd sets the "
        f"class count from the data, so the {what} must be trained or fine-tuned on these {num_classes} "
        f"classes (e.g. `tbd train --model CONFIG --weights {err.path}` on this data, then use its "
        f"model_final.pth), or use data whose categories are the {trained_for} the weights were trained on"
    )
