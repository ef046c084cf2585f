"""What the tabs share: the page, the loaded data set of a browser session, the model preset; and the
small steps of event chains that disable and re-enable buttons.

Each tab module's ``build(studio, shared)`` lays out its tab and binds it; :class:`Shared` carries
what more than one tab reads, so no tab reaches into another's components.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pogdiff.config import PRESETS

PRESET_INFO = "tiny: small pixel-space UNet, runs on CPU · sd15: Stable Diffusion 1.x/2.x with LoRA (GPU)"


@dataclass
class Shared:
    """Components more than one tab uses.

    ``page``: the Blocks, whose load event each tab binds to restore itself after a page reload.
    ``dataset``: the key of the data set this browser session works on; the Data tab sets it, the
    other tabs read it and refresh their banner when it changes.
    ``preset``: the model preset; the Train tab shows it and trains with it, the Neighbours tab shows
    that preset's preparation. It is made unrendered here and rendered by the Train tab.
    """

    page: gr.Blocks
    dataset: gr.State
    preset: gr.Radio

    @classmethod
    def create(cls, page: gr.Blocks) -> Shared:
        """The shared components, inside ``page`` (before the tabs are laid out)."""
        return cls(
            page=page,
            dataset=gr.State(None),
            preset=gr.Radio(list(PRESETS), value="tiny", label="Model preset", info=PRESET_INFO, render=False),
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
