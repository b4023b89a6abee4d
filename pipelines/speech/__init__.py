"""Flow-matching speech enhancement (FlowMSE) on the shared flow sampler (issue 16).

- stft.py: the compressed complex STFT (16 kHz, n_fft 510, hop 128) and its exact inverse.
- model.py: the velocity model signature, SpeechVelocity (a diffusers UNet2DModel), tiny_unet,
  and the SpeechEnhancer container (save_pretrained / from_pretrained of a folder with speech.json).
- family.py: SpeechFamily, registered with the flow sampler for "SpeechEnhancer" on import.

    from mmgrpo.pipelines.flow import FlowAdapter
    adapter = FlowAdapter(path="assets/audio", kernel="sde", num_steps=10, window=2)

Importing this package registers the family; FlowAdapter(path=...) imports it for a folder with speech.json.
"""

from mmgrpo.pipelines.speech.family import SpeechFamily, load_waveform
from mmgrpo.pipelines.speech.model import SpeechEnhancer, SpeechVelocity, tiny_unet
from mmgrpo.pipelines.speech.stft import DEFAULT_STFT, STFTSettings, latents_to_waveform, waveform_to_latents

__all__ = [
    "DEFAULT_STFT", "STFTSettings", "SpeechEnhancer", "SpeechFamily", "SpeechVelocity", "latents_to_waveform",
    "load_waveform", "tiny_unet", "waveform_to_latents",
]
