"""The benchmarks behind ``python -m pogdiff bench <name>`` (BENCHMARKS.md) and the building of the
shipped artefacts (:mod:`pogdiff.bench.ship`, behind ``python -m pogdiff build``).

One registry: every benchmark module registers its own sub-commands with an ``add_parsers(sub)``
of its own; :func:`add_parsers` collects them for :mod:`pogdiff.cli`. The modules import their
heavy dependencies (torch, training, checkpoints) where they use them, so ``--help`` stays instant.

- :mod:`~pogdiff.bench.quality`: ``speed``, ``quality``, ``report``
- :mod:`~pogdiff.bench.records`: ``combine``
- :mod:`~pogdiff.bench.tune`: ``tune``
- :mod:`~pogdiff.bench.scale`: ``knn``, ``sampling``, ``data``, ``metrics``
- :mod:`~pogdiff.bench.gpu`: ``gpu``
- :mod:`~pogdiff.bench.train_tab_timing`: ``train-tab``
- :mod:`~pogdiff.bench.judge_agreement`: ``judge``
- :mod:`~pogdiff.bench.load`: ``load`` (its visitors: :mod:`~pogdiff.bench.visitors`)
"""

from __future__ import annotations

from pogdiff.bench import gpu, load, quality, records, scale, tune
from pogdiff.bench import judge_agreement as judge
from pogdiff.bench import train_tab_timing as train_tab

BENCHMARKS = (quality, records, tune, scale, gpu, train_tab, judge, load)  # the modules whose commands ``bench`` lists, in order


def add_parsers(sub) -> None:
    """Register every benchmark's sub-commands on ``sub`` (the ``bench`` command's sub-parsers)."""
    for module in BENCHMARKS:
        module.add_parsers(sub)
