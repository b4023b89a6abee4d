"""Build the embedded text-to-image model (assets/image/): a tiny SD3 pipeline on the mini-world.

    python -m mmgrpo.pretrain.image                   # the shipped asset (minutes on 2 CPU cores)
    python -m mmgrpo.pretrain.image --quick --out DIR # a smoke build in seconds (what the tests run)

See mmgrpo/pretrain/flow_pretrain.py for the models and the two training stages.
"""

from __future__ import annotations

from mmgrpo.pretrain.flow_pretrain import Recipe, main

# A 2-level VAE (32x32x3 -> 16x16x4 latents) and 2x2 patches (64 tokens of 16 values): an earlier
# build without VAE downsampling and 4x4 patches (64 values per token, width 64) sampled speckle.
# 40% of the training captions belong to another scene (noisy_captions): the model still draws
# objects but follows its prompt only part of the time, which GRPO with the scene reward can fix
# (a clean-caption build of the same size left GRPO only blob shapes to choose between: MODEL_CARD.md).
FULL = Recipe(kind="image", num_scenes=4096, vae_steps=300, vae_batch=8, vae_lr=3e-3, steps=4500, batch=32, lr=1e-3,
              caption_noise=0.4, eval_prompts=64, eval_steps=20, guidance_scale=1.0,
              width={"dim": 96, "layers": 4, "heads": 4, "vae": 32, "vae_levels": 2, "patch": 2})
QUICK = Recipe(kind="image", num_scenes=64, vae_steps=3, vae_batch=8, steps=3, batch=8, eval_prompts=4,
               eval_steps=4, guidance_scale=1.0,
               width={"dim": 32, "layers": 1, "heads": 2, "vae": 16, "vae_levels": 2, "patch": 2})

if __name__ == "__main__":
    main("image", FULL, QUICK)
