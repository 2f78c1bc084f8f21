"""Finding the looks of a concept in the flagged images (`hfi_core.modes`), on embeddings whose
structure is known: what varies among all images (colour, shape) is larger than the looks."""

import numpy as np
import pytest

from hfi_core.modes import find_modes, kmeans, silhouette


def _world(n_per_look=40, looks=3, n_rest=120, seed=0):
    """Embeddings (N, 24): every image has a large colour/shape part (dims 0-5), unflagged images a
    style of their own (dim 6), flagged ones one of ``looks`` directions (dims 8...), small noise."""
    g = np.random.default_rng(seed)
    n_flag = n_per_look * looks
    x = np.zeros((n_flag + n_rest, 24))
    x[:, :6] = g.normal(0, 3.0, (len(x), 6))  # what varies whatever the concept: large
    x[n_flag:, 6] = 1.0 + g.choice([0, 1], n_rest)  # two neighbours (dotted, plain)
    look = np.repeat(np.arange(looks), n_per_look)
    x[np.arange(n_flag), 8 + look] = 1.0
    x += g.normal(0, 0.05, x.shape)
    flagged = np.arange(len(x)) < n_flag
    return x, flagged, look


def _purity(labels, truth):
    return sum(np.bincount(truth[labels == k]).max() for k in np.unique(labels)) / len(labels)


def test_the_looks_are_found_where_plain_kmeans_splits_by_colour_and_shape():
    x, flagged, look = _world()
    plain, _ = kmeans(x[flagged] / np.linalg.norm(x[flagged], axis=1, keepdims=True), 3, np.random.default_rng(0))
    assert _purity(plain, look) < 0.7  # without the projection: clusters of colour and shape
    modes = find_modes(x, flagged, modes=0)
    assert modes.count == 3 and modes.silhouettes[3] == max(modes.silhouettes.values())
    assert _purity(modes.labels[flagged], look) == 1.0
    assert (modes.labels[~flagged] == -1).all() and modes.dims_removed >= 6
    assert modes.sizes() == sorted(modes.sizes(), reverse=True) and sum(modes.sizes()) == flagged.sum()


def test_a_fixed_count_is_kept_and_one_mode_needs_no_clustering():
    x, flagged, look = _world(seed=1)
    two = find_modes(x, flagged, modes=2)
    assert two.count == 2 and not two.silhouettes
    one = find_modes(x, flagged, modes=1)
    assert one.count == 1 and (one.labels[flagged] == 0).all() and (one.labels[~flagged] == -1).all()


def test_flagged_images_of_one_look_stay_one_mode():
    x, flagged, _ = _world(looks=1, n_per_look=90, seed=2)
    modes = find_modes(x, flagged, modes=0)
    assert modes.count == 1 and max(modes.silhouettes.values()) < 0.5


def test_the_split_is_the_same_on_a_rerun_and_names_modes_by_size():
    x, flagged, _ = _world(n_per_look=30, seed=3)
    x = np.concatenate([x, x[:20]])  # look 0 gets 20 more images: it must be mode 0
    flagged = np.concatenate([flagged, flagged[:20]])
    a, b = find_modes(x, flagged, modes=0, seed=5), find_modes(x, flagged, modes=0, seed=5)
    assert (a.labels == b.labels).all() and a.sizes() == [50, 30, 30]


def test_too_few_flagged_images_to_split_is_one_clear_error():
    x, flagged, _ = _world()
    few = np.zeros(len(x), dtype=bool)
    few[:2] = True
    with pytest.raises(ValueError, match=r"invert.modes: 2 flagged image\(s\) cannot split into 3 looks"):
        find_modes(x, few, modes=3)
    assert find_modes(x, few, modes=0).count == 1  # too few to choose: one look


def test_silhouette_matches_its_definition_on_a_small_case():
    x = np.array([[0.0], [1.0], [10.0], [12.0]])
    labels = np.array([0, 0, 1, 1])
    # point 0: a = 1, b = mean(10, 12) = 11 -> 10/11; point 1: a = 1, b = 10 -> 0.9;
    # point 2: a = 2, b = 9.5 -> 7.5/9.5; point 3: a = 2, b = 11.5 -> 9.5/11.5
    expected = np.mean([10 / 11, 0.9, 7.5 / 9.5, 9.5 / 11.5])
    assert silhouette(x, labels) == pytest.approx(expected)


def test_a_look_continues_the_earlier_look_that_most_of_its_images_belonged_to():
    from hfi_core.inversion import warm_matches

    ids = [f"i{n}" for n in range(10)]
    # tonight: look 0 = i0..i3, look 1 = i4..i7 (i8, i9 new and i9 unflagged)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, -1])
    earlier = {"i0": 1, "i1": 1, "i2": 1, "i3": 0, "i4": 0, "i5": 0, "i6": 0, "i7": 1}
    assert warm_matches(ids, labels, earlier) == {0: 1, 1: 0}  # the looks swapped their numbers
    # a look only half made of one earlier look's images starts afresh
    assert warm_matches(ids, labels, {"i0": 1, "i1": 1, "i4": 0, "i5": 0, "i6": 0}) == {1: 0}
    # two looks that both grew out of one earlier look: only the better-supported one continues it
    assert warm_matches(ids, labels, {i: 0 for i in ids}) == {1: 0}
    assert warm_matches(ids, labels, {}) == {}
