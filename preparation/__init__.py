"""Preparation: feature pipelines built from a spec, fitted into versioned feature sets.

The pure core of the Preparation stage (no broker, no store)::

    from preparation import build_pipeline, join_inputs, missing_inputs, parse_spec

    spec = parse_spec(config["features"])
    if not missing_inputs(spec, arrived):
        frame = join_inputs(frames, spec)
        fitted = build_pipeline(spec).fit(frame, batch_ids)
        offline = fitted.transform(frame)               # features + carried columns
        online = fitted.transform_online(records)       # same steps, no row filters
"""

from preparation.join import join_inputs, missing_inputs
from preparation.pipeline import (
    FeaturePipeline,
    FittedFeatureSet,
    SkewWarning,
    build_pipeline,
    feature_set_id,
)
from preparation.registry import StepContext, known_kinds, register
from preparation.spec import FeatureSpec, JoinSpec, StepSpec, parse_spec

__all__ = [
    "FeaturePipeline", "FeatureSpec", "FittedFeatureSet", "JoinSpec", "SkewWarning",
    "StepContext", "StepSpec", "build_pipeline", "feature_set_id", "join_inputs",
    "known_kinds", "missing_inputs", "parse_spec", "register",
]
