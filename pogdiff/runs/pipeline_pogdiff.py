"""PoGDiffPipeline: the text-to-image pipeline of an exported ``tiny`` PoGDiff Studio model.

This file is copied as-is into every exported folder (``python -m pogdiff export``, see the
README's "Command line" section) and loaded from there by

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

so it must import nothing but torch, numpy, PIL, diffusers and transformers. It reproduces
``python -m pogdiff sample`` step for step:

- captions go through the frozen sentence encoder (BERT-style, e.g. all-MiniLM-L6-v2):
  the last hidden states, truncated / zero-padded to ``max_caption_tokens`` and zeroed on
  padding, condition the UNet together with their attention mask
  (``encoder_attention_mask``);
- classifier-free guidance against the empty caption, ``eps = eps(null) + w (eps(y) - eps(null))``;
- the UNet works in pixel space (``[-1, 1]`` RGB), the scheduler clips its x0 estimate to
  ``[-1, 1]`` and uses "trailing" timestep spacing;
- image ``i`` starts from ``torch.randn(shape, generator=generator[i])`` drawn on the CPU, so
  ``generator=[torch.Generator().manual_seed(s) for s in seeds]`` gives the same pictures as
  ``python -m pogdiff sample --seeds ...``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

OUTPUT_TYPES = ("pil", "np")
ENCODE_BATCH = 256  # captions per text-encoder pass, as pogdiff.model.text.MiniLMEncoder


class PoGDiffPipeline(DiffusionPipeline):
    """Pixel-space text-to-image pipeline: UNet2DConditionModel + DDIM + a BERT caption encoder."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, scheduler, text_encoder, tokenizer, max_caption_tokens: int = 32,
                 max_seq_length: int = 256, use_attention_mask: bool = True):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(max_caption_tokens=int(max_caption_tokens), max_seq_length=int(max_seq_length),
                                use_attention_mask=bool(use_attention_mask))

    # --- captions ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> token states ``[N, max_caption_tokens, C]`` (zero on padding) and a bool mask,
        encoded ``ENCODE_BATCH`` captions at a time (padding depends on the batch, as in training)."""
        parts = [self._encode_batch(prompts[i:i + ENCODE_BATCH]) for i in range(0, len(prompts), ENCODE_BATCH)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.config.max_seq_length,
                               return_tensors="pt").to(self.text_encoder.device)
        states = self.text_encoder(**batch).last_hidden_state.float()  # [B, T, C]
        mask = batch["attention_mask"]
        length = self.config.max_caption_tokens
        states, mask = states[:, :length], mask[:, :length]
        missing = length - states.shape[1]
        if missing > 0:
            states = F.pad(states, (0, 0, 0, missing))
            mask = F.pad(mask, (0, missing))
        states = states * mask[..., None].to(states.dtype)
        return states.to(self.unet.device), mask.bool().to(self.unet.device)

    # --- noise ---------------------------------------------------------------------------------

    def _initial_noise(self, n: int, generator: Any) -> torch.Tensor:
        shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images; pass one per image "
                                 "(len(prompt) * num_images_per_prompt) or a single one")
            return torch.stack([torch.randn(shape, generator=g) for g in generator])
        return torch.randn((n, *shape), generator=generator)

    def _eps(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"encoder_attention_mask": mask} if self.config.use_attention_mask else {}
        dtype = self.unet.dtype
        out = self.unet(x.to(dtype), t.expand(len(x)), encoder_hidden_states=ctx.to(dtype), **kwargs).sample
        return out.to(x.dtype)

    # --- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 64,
    ):
        """Images for ``prompt`` (prompt-major: every image of the first prompt, then the next).

        :param generator: one CPU ``torch.Generator`` per image (reproducible per image, as
            ``python -m pogdiff sample``), a single one for all, or None.
        :param output_type: "pil" (list of PIL images) or "np" (float32 ``[N, H, W, 3]`` in [0, 1]).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_inference_steps < 1 or num_images_per_prompt < 1 or batch_size < 1:
            raise ValueError("num_inference_steps, num_images_per_prompt and batch_size must be >= 1")
        captions = [p for p in prompts for _ in range(num_images_per_prompt)]
        device = self.unet.device
        tokens, mask = self.encode_prompt(captions)
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            null_tokens, null_mask = self.encode_prompt([""])
        noise = self._initial_noise(len(captions), generator)
        out = []
        for start in range(0, len(captions), batch_size):
            sl = slice(start, start + batch_size)
            x = noise[sl].to(device)
            b = len(x)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            x = x * self.scheduler.init_noise_sigma
            for t in self.progress_bar(self.scheduler.timesteps):
                x_in = self.scheduler.scale_model_input(x, t)
                if use_cfg:
                    ctx = torch.cat([null_tokens.expand(b, -1, -1), tokens[sl]])
                    m = torch.cat([null_mask.expand(b, -1), mask[sl]])
                    eps_null, eps_cond = self._eps(torch.cat([x_in, x_in]), t, ctx, m).chunk(2)
                    eps = eps_null + guidance_scale * (eps_cond - eps_null)
                else:
                    eps = self._eps(x_in, t, tokens[sl], mask[sl])
                x = self.scheduler.step(eps, t, x).prev_sample
            pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
        images = np.concatenate(out)
        result = [Image.fromarray(img) for img in images] if output_type == "pil" else images.astype(np.float32) / 255
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
