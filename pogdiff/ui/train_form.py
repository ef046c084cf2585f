"""The Train tab's options as one named structure, and the endpoints that take them.

:class:`TrainForm` names every field of the Train form once. The Train tab builds one from its
components (``TrainForm(method=gr.Radio(...), ...)``) and sends ``form.values()`` to **Start** and
**Estimate time**; their handlers receive a :class:`TrainForm` of values. The public API
endpoints ``/start_training`` and ``/estimate_time`` take the same fields as named parameters:
:func:`form_endpoint` gives a handler ``(key, form, request)`` the signature
``(key, method, preset, ..., base, request)`` that gradio reads the parameter names from.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from pogdiff.config import BALANCES, METHODS, PRESETS, PsiConfig, TrainConfig
from pogdiff.config import POOLS

# The budget chosen from the quality benchmark's curve: at 300 steps no recipe has learned the rare
# subjects of the embedded sets yet (README "Results").
DEFAULT_STEPS = TrainConfig().max_steps
DEFAULT_PREVIEW_EVERY = 50

_TRAIN, _PSI = TrainConfig(), PsiConfig()


@dataclass(frozen=True)
class TrainForm:
    """The Train form's fields in the order the form sends them, with the form's initial values.

    Values come from a browser or an API caller as they are:
    :meth:`pogdiff.ui.train_jobs.TrainJobs.build_configs` checks each one on the server. The same class
    also holds the form's components, one per field, where the Train tab lays them out.
    """

    method: str = "pogdiff"
    preset: str = "tiny"
    pretrained: str = ""  # sd15: a diffusers model id (or, single-user, a local folder)
    steps: float = DEFAULT_STEPS
    batch_size: float = _TRAIN.batch_size
    lr: float = _TRAIN.learning_rate
    psi_max: float = _PSI.psi_max
    k: float = _PSI.k
    use_density: bool = _PSI.use_density
    use_image_sim: bool = _PSI.use_image_sim
    use_text_sim: bool = _PSI.use_text_sim
    pool: str = _PSI.pool
    sample_every: float = DEFAULT_PREVIEW_EVERY
    seed: float = _TRAIN.seed
    run_name: str = ""  # empty: a dated name
    from_scratch: bool = False  # kept for API callers: the form's Start from does the same with "scratch"
    base: str = ""  # Start from: "shipped" (or empty), "scratch" or "run:<name>"
    # Class balance (README "Training options"): "method" (the method's batches) or "from-data" (the
    # set's own kohya / OneTrainer repeats); loss_weights: "class=weight; ..." (empty: none, or with
    # from-data the set's own).
    balance: str = "method"
    loss_weights: str = ""

    # API callers may leave these out (README "Scripting the app"); the fields before them are required.
    OPTIONAL: typing.ClassVar[tuple[str, ...]] = ("run_name", "from_scratch", "base", "balance", "loss_weights")
    # What a page load puts back from the running or last run's run.json (the run name stays empty).
    RESTORED: typing.ClassVar[tuple[str, ...]] = ("method", "preset", "pretrained", "steps", "batch_size", "lr",
                                                  "psi_max", "k", "use_density", "use_image_sim", "use_text_sim",
                                                  "pool", "sample_every", "seed", "base", "balance",
                                                  "loss_weights")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def values(self) -> list[Any]:
        """The fields' values (or components) in order: the inputs of Start and Estimate time."""
        return [getattr(self, name) for name in self.names()]

    def pick(self, names: typing.Iterable[str]) -> list[Any]:
        return [getattr(self, name) for name in names]


def form_endpoint(handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler(self, key, form, request)`` as a method whose parameters are the form's fields:
    ``(self, key, method, preset, ..., base, request=None)``, called positionally (as gradio does)
    or by name. :attr:`TrainForm.OPTIONAL` fields default to the form's values."""
    hints = typing.get_type_hints(TrainForm)
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), P("key", P.POSITIONAL_OR_KEYWORD, annotation=str | None)]
    defaults = TrainForm()
    for name in TrainForm.names():
        default = getattr(defaults, name) if name in TrainForm.OPTIONAL else P.empty
        params.append(P(name, P.POSITIONAL_OR_KEYWORD, default=default, annotation=hints[name]))
    params.append(P("request", P.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request))
    signature = inspect.Signature(params)

    @functools.wraps(handler)
    def endpoint(self, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        form = TrainForm(**{name: given[name] for name in TrainForm.names()})
        return handler(self, given["key"], form, given["request"])

    endpoint.__signature__ = signature
    endpoint.__annotations__ = {p.name: p.annotation for p in params[1:]}
    return endpoint


def form_values(meta: dict[str, Any], *, base_available: bool = True) -> dict[str, Any] | None:
    """The Train form's values (:attr:`TrainForm.RESTORED` but ``base``, and ``from_scratch``) from a
    run's ``run.json``, or None when it lacks the saved configs. ``from_scratch`` is True for a tiny run
    without a base checkpoint while one is available (without one every tiny run starts from a random UNet)."""
    train, model = meta.get("train_cfg"), meta.get("model_cfg")
    if not isinstance(train, dict) or not isinstance(model, dict):
        return None
    psi = train.get("psi") if isinstance(train.get("psi"), dict) else {}
    defaults = PsiConfig()
    preset = model.get("preset") if model.get("preset") in PRESETS else "tiny"
    method = train.get("method") if train.get("method") in METHODS else meta.get("method")
    if method not in METHODS or not isinstance(train.get("max_steps"), int):
        return None
    return {
        "method": method, "preset": preset,
        "pretrained": str(model.get("pretrained") or "") if preset == "sd15" else "",
        "steps": train["max_steps"], "batch_size": train.get("batch_size"), "lr": train.get("learning_rate"),
        "psi_max": psi.get("psi_max", defaults.psi_max), "k": psi.get("k", defaults.k),
        "use_density": bool(psi.get("use_density", defaults.use_density)),
        "use_image_sim": bool(psi.get("use_image_sim", defaults.use_image_sim)),
        "use_text_sim": bool(psi.get("use_text_sim", defaults.use_text_sim)),
        "pool": psi.get("pool") if psi.get("pool") in POOLS else defaults.pool,
        "sample_every": train.get("sample_every", 0), "seed": train.get("seed", 0),
        "balance": train.get("balance") if train.get("balance") in BALANCES else "method",
        "loss_weights": "; ".join(f"{c}={w:g}" for c, w in sorted((train.get("class_loss_weights") or {}).items())
                                  if isinstance(w, (int, float))),
        "from_scratch": preset == "tiny" and base_available and not meta.get("base_checkpoint"),
    }
