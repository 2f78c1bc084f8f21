import hashlib

import numpy as np

from hfi_core.nudity import DEFAULT_CLASSES, NudityDetector
from hfi_core.toyworld.render import render_many, sample_scenes


def test_nudenet_runs_offline_and_names_its_onnx_file_classes_and_threshold():
    detector = NudityDetector(threshold=0.5)
    identity = detector.identity()
    assert identity["onnx_sha256"] == hashlib.sha256(detector.onnx.read_bytes()).hexdigest()
    assert identity["classes"] == list(DEFAULT_CLASSES) and identity["threshold"] == 0.5
    assert identity["package"].startswith("nudenet 3.")
    flags = detector.flags(render_many(sample_scenes(4, 0)))
    assert flags.dtype == bool and flags.shape == (4,) and not flags.any()  # shapes on a dark ground are not nudity
    assert NudityDetector(classes=[], threshold=0.0).flags(np.zeros((2, 64, 64, 3), np.uint8)).tolist() == [
        False,
        False,
    ]
