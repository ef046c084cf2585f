"""The Gradio app's tabs and what their buttons call: the :class:`Studio` and pure helpers.

Each tab module lays out its tab and binds it to the Studio (``build(studio, shared)``):
:mod:`~pogdiff.ui.data_tab`, :mod:`~pogdiff.ui.neighbours_tab`, :mod:`~pogdiff.ui.train_tab`,
:mod:`~pogdiff.ui.compare_tab`; ``app.py`` only assembles them, with the components they share
(:mod:`~pogdiff.ui.shared`). Every callback is a method of :class:`Studio`, which keeps the
server-side state (loaded datasets, neighbour tables, loaded models, the training
:class:`~pogdiff.runs.jobs.JobManager`) and is made of one mixin per concern: ``DataTab``,
``NeighboursTab``, ``CompareTab`` (beside their tab's ``build``), ``TrainJobs`` and ``TrainRuns``
(:mod:`~pogdiff.ui.train_jobs`, :mod:`~pogdiff.ui.train_runs`), ``MetricsPanel``
(:mod:`~pogdiff.ui.metrics_panel`, the Compare tab's metrics). The Train form's fields travel as one
:class:`TrainForm` (:mod:`~pogdiff.ui.train_form`). Pure helpers of plain data, tested without a
browser: :mod:`~pogdiff.ui.views` and :mod:`~pogdiff.ui.compare_views`; :mod:`~pogdiff.ui.state`
holds loaded data sets and checkpoint sources. Nothing heavy happens at import or construction
time: the demo set, the text encoder and the models are built on first use.
"""

from pogdiff.ui.studio import Studio
from pogdiff.ui.train_form import TrainForm

__all__ = ["Studio", "TrainForm"]
