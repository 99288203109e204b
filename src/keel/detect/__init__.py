"""Decide: signal history → findings (kind, step, severity, evidence, cause, remedy). Never acts."""

from keel.detect.detector import DETECTORS, Detector, create_detector, list_detectors
from keel.detect.divergence import DivergenceConfig, DivergenceDetector
from keel.detect.non_finite import NonFiniteConfig, NonFiniteDetector
from keel.detect.robust import robust_location_scale, robust_z
from keel.detect.spike import SpikeConfig, SpikeDetector

__all__ = [
    "DETECTORS",
    "Detector",
    "DivergenceConfig",
    "DivergenceDetector",
    "NonFiniteConfig",
    "NonFiniteDetector",
    "SpikeConfig",
    "SpikeDetector",
    "create_detector",
    "default_detectors",
    "list_detectors",
    "robust_location_scale",
    "robust_z",
]


def default_detectors() -> list[Detector]:
    """The detectors a `Guard` runs unless told otherwise: loss and gradient spikes, divergence, non-finite."""
    return [SpikeDetector(signal="loss"), SpikeDetector(signal="grad/norm"), DivergenceDetector(),
            NonFiniteDetector()]
