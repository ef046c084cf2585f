"""What the tabs share: the page, the loaded data set of a browser session, the model preset; and the
small steps of event chains that disable and re-enable buttons.

Each tab module's ``build(studio, shared)`` lays out its tab and binds it; :class:`Shared` carries
what more than one tab reads, so no tab reaches into another's components.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pogdiff.config import PRESETS

POLL_SECONDS = 1.0  # the timer that polls the server-side job: refresh-proof, shared by all tabs
LOSS_WEIGHTS_INFO = ("class=weight; class=weight: each class's loss times its weight (the others 1), from the Data "
                     "tab's Balancing panel or typed; with your repeats and this empty, the set's own loss weights")
PRESET_INFO = "tiny: small pixel-space UNet, runs on CPU · sd15: Stable Diffusion 1.x/2.x with LoRA (GPU)"


@dataclass
class Shared:
    """Components more than one tab uses, or that must sit on the page outside every tab.

    ``page``: the Blocks, whose load event each tab binds to restore itself after a page reload.
    ``dataset``: the key of the data set this browser session works on; the Data tab sets it, the
    other tabs read it and refresh their banner when it changes.
    ``preset``: the model preset; the Train tab shows it and trains with it, the Neighbours tab shows
    that preset's preparation. It is made unrendered here and rendered by the Train tab.
    ``loss_weights``: the Train form's class loss weights (``class=weight; ...``), which the Data tab's
    Balancing panel fills; made unrendered here, rendered by the Train tab.
    ``kept_dataset`` and ``kept_compare``: what the browser keeps over a page reload (the Data tab's
    dataset key; the Compare tab's choices and a token of its results), and ``timer``, which polls
    the training job. They live on the page, not in a tab: a tab's components mount only when the
    tab is first shown, and these work whichever tab is open.
    """

    page: gr.Blocks
    dataset: gr.State
    preset: gr.Radio
    loss_weights: gr.Textbox
    kept_dataset: gr.BrowserState
    kept_compare: gr.BrowserState
    timer: gr.Timer

    @classmethod
    def create(cls, page: gr.Blocks, browser_secret: str) -> Shared:
        """The shared components, inside ``page`` (before the tabs are laid out); ``browser_secret``
        signs what the browser keeps."""
        return cls(
            page=page,
            dataset=gr.State(None),
            preset=gr.Radio(list(PRESETS), value="tiny", label="Model preset", info=PRESET_INFO, render=False),
            loss_weights=gr.Textbox("", label="Class loss weights", max_lines=3, render=False,
                                    info=LOSS_WEIGHTS_INFO, elem_id="pg-loss-weights"),
            kept_dataset=gr.BrowserState(None, storage_key="pogdiff-dataset", secret=browser_secret),
            kept_compare=gr.BrowserState(None, storage_key="pogdiff-compare", secret=browser_secret),
            timer=gr.Timer(POLL_SECONDS),
        )


# Steps of event chains. Every chain that disables a button re-enables it on failure too (.then runs
# only after success of the step before it in this gradio version; .failure runs only after an error).
def disable():
    return gr.Button(interactive=False)


def enable():
    return gr.Button(interactive=True)


def disable_two():
    return gr.Button(interactive=False), gr.Button(interactive=False)


def enable_two():
    return gr.Button(interactive=True), gr.Button(interactive=True)


def same(value):
    return value


def show_file():
    return gr.File(visible=True)


def empty_text():
    return ""
