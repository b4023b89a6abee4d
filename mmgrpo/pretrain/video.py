"""Build the embedded text-to-video model (assets/video/): a tiny Wan 2.1 pipeline on the mini-world.

    python -m mmgrpo.pretrain.video                   # the shipped asset (minutes on 2 CPU cores)
    python -m mmgrpo.pretrain.video --quick --out DIR # a smoke build in seconds (what the tests run)

Clips are 9 frames of 32x32 (the mini-world's 8-frame motion resampled to 1 + 4 * 2 frames,
the frame counts a Wan VAE's causal scheme accepts; the tiny VAE keeps all 9 as latent frames).
See mmgrpo/pretrain/flow_pretrain.py for the models and the two training stages.
"""

from __future__ import annotations

from mmgrpo.pretrain.flow_pretrain import Recipe, main

FULL = Recipe(kind="video", num_scenes=2048, vae_steps=1200, vae_batch=4, vae_lr=3e-3, vae_fg_weight=9.0,
              pixel_scale=0.9, steps=8000, batch=16, lr=1e-3,
              eval_prompts=32, eval_steps=20, guidance_scale=1.0, width={"dim": 128, "layers": 4, "heads": 4, "vae": 16})
QUICK = Recipe(kind="video", num_scenes=16, vae_steps=2, vae_batch=2, pixel_scale=0.9, steps=2, batch=4, eval_prompts=2,
               eval_steps=3, guidance_scale=1.0, width={"dim": 32, "layers": 1, "heads": 2, "vae": 8})

if __name__ == "__main__":
    main("video", FULL, QUICK)
