import dataclasses
import itertools

import numpy as np
import pytest

from pogdiff.data.identities import (
    ATTRIBUTE_HEADS,
    BIG_TRAITS,
    Attributes,
    age_group,
    attribute_labels,
    caption,
    make_identities,
    sample_attributes,
)
from pogdiff.data.render import render

BASE = Attributes(age=30, smiling=False, glasses=False, dx=0, dy=0, scale=1.0, background=0)


def test_make_identities_is_deterministic_and_names_are_unique():
    a, b = make_identities(24, seed=3), make_identities(24, seed=3)
    assert a == b
    assert len({i.name for i in a}) == 24
    assert make_identities(24, seed=4) != a


def test_make_identities_is_prefix_stable():
    assert make_identities(64, seed=0)[:24] == make_identities(24, seed=0)


def test_first_and_last_names_do_not_repeat_while_fresh_ones_remain():
    names = [i.name.split(" ") for i in make_identities(40, seed=1)]
    assert len({f for f, _ in names}) == 40
    assert len({last for _, last in names}) == 40


def test_exclude_keeps_names_out():
    taken = [i.name for i in make_identities(30, seed=0)]
    others = make_identities(30, seed=0, exclude=taken)
    assert not {i.name for i in others} & set(taken)


def test_too_many_identities_is_an_error():
    with pytest.raises(ValueError, match="n must be in 0..2500"):
        make_identities(2501, seed=0)


def test_big_traits_are_spread_apart():
    ids = make_identities(64, seed=0)
    dist = [sum(x != y for x, y in zip(a.big_traits(), b.big_traits())) for a, b in itertools.combinations(ids, 2)]
    # 6 big traits; greedy farthest-point selection keeps every pair at least 3 traits apart,
    # and the first 24 (the demo's fine-tuning identities) at least 4.
    assert len(ids[0].big_traits()) == len(BIG_TRAITS) == 6
    assert min(dist) >= 3
    first = ids[:24]
    assert min(sum(x != y for x, y in zip(a.big_traits(), b.big_traits()))
               for a, b in itertools.combinations(first, 2)) >= 4
    for t in range(len(BIG_TRAITS)):
        assert len({i.big_traits()[t] for i in first}) >= 4


def test_sample_attributes_ranges():
    rng = np.random.default_rng(0)
    attrs = [sample_attributes(rng) for _ in range(2000)]
    ages = [a.age for a in attrs]
    assert min(ages) == 20 and max(ages) == 80
    assert {a.dx for a in attrs} == {-2, -1, 0, 1, 2} == {a.dy for a in attrs}
    assert all(0.94 <= a.scale <= 1.06 for a in attrs)
    assert 0.45 < np.mean([a.smiling for a in attrs]) < 0.55
    assert 0.3 < np.mean([a.glasses for a in attrs]) < 0.4
    assert {a.background for a in attrs} == set(range(6))


@pytest.mark.parametrize("age,group", [(20, 0), (34, 0), (35, 1), (59, 1), (60, 2), (80, 2)])
def test_age_group_edges(age, group):
    assert age_group(age) == group


def test_attribute_labels_match_heads():
    labels = attribute_labels(dataclasses.replace(BASE, age=61, smiling=True))
    assert labels == {"smiling": 1, "glasses": 0, "age_group": 2}
    assert set(labels) == set(ATTRIBUTE_HEADS)
    assert all(0 <= labels[k] < n for k, n in ATTRIBUTE_HEADS.items())


def test_caption_text():
    ident = make_identities(1, seed=0)[0]
    attrs = dataclasses.replace(BASE, age=58, smiling=True, glasses=True)
    assert caption(ident, attrs) == f"a photo of {ident.name}, about 60 years old, smiling, wearing glasses"
    assert caption(ident, dataclasses.replace(BASE, age=22)) == f"a photo of {ident.name}, about 20 years old"


def test_render_is_deterministic_rgb_and_sized():
    ident = make_identities(1, seed=0)[0]
    a, b = render(ident, BASE), render(ident, BASE)
    assert a.mode == "RGB" and a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert render(ident, BASE, size=64).size == (64, 64)


def _diff(ident, **change):
    a = np.asarray(render(ident, BASE, 64), dtype=float)
    b = np.asarray(render(ident, dataclasses.replace(BASE, **change), 64), dtype=float)
    return np.abs(a - b).sum(-1) > 30  # [64, 64] changed pixels


@pytest.mark.parametrize("seed", range(5))
def test_attributes_are_visible_where_expected(seed):
    ident = make_identities(1, seed=seed)[0]
    eyes = _diff(ident, glasses=True)
    assert eyes.sum() > 80 and eyes[:20].sum() == 0 and eyes[40:].sum() == 0  # frames around the eyes
    mouth = _diff(ident, smiling=True)
    assert mouth.sum() > 30 and mouth[:30].sum() == 0  # below the eyes only
    assert _diff(ident, age=75).sum() > 150  # grey hair / wrinkles
    shifted = _diff(ident, dx=2)
    assert shifted.sum() > 100


def test_identities_differ_in_many_pixels():
    ids = make_identities(24, seed=0)
    imgs = np.stack([np.asarray(render(i, BASE), dtype=float) for i in ids])
    d = np.abs(imgs[:, None] - imgs[None]).sum(-1)  # [24, 24, 32, 32]
    changed = (d > 60).reshape(24, 24, -1).mean(-1)
    off_diag = changed[~np.eye(24, dtype=bool)]
    assert off_diag.min() > 0.15  # every pair differs in > 15% of pixels with the same attributes
