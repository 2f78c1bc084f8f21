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


def test_batched_detection_gives_each_image_the_scores_it_gets_alone():
    from nudenet.nudenet import _read_image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, 96, 3), dtype=np.uint8) for h in (64, 96, 128)]  # sizes differ too
    detector = NudityDetector(threshold=0.0)
    session = detector.detector.onnx_session
    name = detector.detector.input_name
    blobs = [_read_image(np.ascontiguousarray(im[..., ::-1]), 320)[0] for im in images]
    together = session.run(None, {name: np.vstack(blobs)})[0]
    alone = np.concatenate([session.run(None, {name: b})[0] for b in blobs])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)  # the ONNX graph takes a batch axis
    same = np.stack([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)])
    assert detector.flags(same, batch_size=2).tolist() == [bool(detector.flags(im[None])[0]) for im in same]
