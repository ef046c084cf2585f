"""The Gradio app's tabs and what their buttons call: the :class:`Studio` and pure helpers.

:class:`Studio` (:mod:`~pogdiff.ui.studio`) makes the page's services once per server: the data sets
(:mod:`~pogdiff.ui.datasets`), the training :class:`~pogdiff.runs.jobs.JobManager` and its runs, the
checkpoints Compare loads (:mod:`~pogdiff.ui.sources`), the visitors (:mod:`~pogdiff.ui.sessions`), the
device; and one controller per tab over the services it uses: ``DataTab``, ``NeighboursTab``,
``TrainJobs`` and ``TrainRuns`` (the Train tab), ``CompareTab`` and ``MetricsPanel`` (the Compare tab),
``Sessions`` (the usage panel). Each tab module lays out its tab and binds it to its controller
(``data_tab.build(studio.data, shared)``, ...); ``app.py`` only assembles them, with the components they
share (:mod:`~pogdiff.ui.shared`). The Train form's fields travel as one :class:`TrainForm`
(:mod:`~pogdiff.ui.train_form`). Pure helpers of plain data, tested without a browser:
:mod:`~pogdiff.ui.views`, :mod:`~pogdiff.ui.compare_views` and :mod:`~pogdiff.ui.neighbours_views`;
:mod:`~pogdiff.ui.state` holds a loaded data set, a checkpoint source and the device. Nothing heavy
happens at import or construction time: the demo set, the text encoder and the models are built on first
use.
"""

from pogdiff.ui.studio import Studio
from pogdiff.ui.train_form import TrainForm

__all__ = ["Studio", "TrainForm"]
