"""The speech family on the shared flow sampler: STFT, encode/decode, sampling, saving, the asset build."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from mmgrpo.pipelines.flow.adapter import FlowAdapter  # noqa: E402
from mmgrpo.pipelines.speech import SpeechEnhancer, SpeechFamily, tiny_unet  # noqa: E402
from mmgrpo.pipelines.speech import stft  # noqa: E402


def _items(lengths=(4000, 3000), seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i, n in enumerate(lengths):
        clean = (0.3 * np.sin(2 * np.pi * 300 * np.arange(n) / 16000)).astype(np.float32)
        noisy = (clean + 0.05 * (i + 1) * rng.standard_normal(n)).astype(np.float32)
        items.append({"prompt": f"tone {i}", "noisy": noisy, "clean": clean, "sample_rate": 16000})
    return items


def _adapter(**kwargs):
    options = dict(kernel="sde", num_steps=4, eval_steps=3, window=2, finetune="full")
    return FlowAdapter(SpeechEnhancer(tiny_unet(0, widths=(8, 16), patch=4)), **{**options, **kwargs})


def test_stft_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    wave = torch.rand(3, 16384, generator=g) * 2 - 1  # [3, L]
    for length in (16384, 12345, 300):
        latents = stft.waveform_to_latents(wave[:, :length])  # [3, 2, 256, F]
        assert latents.shape[:3] == (3, 2, 256) and latents.shape[3] % 16 == 0
        assert stft.padded_length(latents.shape[3]) >= length
        back = stft.latents_to_waveform(latents, length)  # [3, L]
        assert (back - wave[:, :length]).abs().max() < 1e-5
    z = torch.randn(4, 256, 8, dtype=torch.complex64, generator=g)
    c = stft.compress(z)
    assert torch.allclose(c.abs(), 0.15 * z.abs() ** 0.5, atol=1e-6)
    assert torch.allclose(stft.decompress(c), z, atol=1e-5)


def test_encode_decode_shapes_and_scale():
    adapter = _adapter()
    family = adapter.family
    assert isinstance(family, SpeechFamily) and adapter.family_name == "speech"
    items = _items((4000, 3000))
    items[1]["noisy"] = items[1]["noisy"] * 3  # another peak
    cond = family.encode(items, torch.device("cpu"))
    assert cond["y"].shape == (2, 2, 256, stft.frames_for(4000)) and cond["length"].tolist() == [4000, 3000]
    assert torch.allclose(cond["scale"], torch.tensor([float(np.abs(it["noisy"]).max()) for it in items]))
    decoded = family.decode(cond["y"], cond)  # the prior mean decodes to the noisy input, rescaled and cropped
    rows = list(decoded.unbind(0))
    assert [r.shape[0] for r in rows] == [4000, 3000] and all(r.dtype == torch.float32 for r in rows)
    for row, item in zip(rows, items):
        assert np.abs(row.numpy() - item["noisy"]).max() < 1e-5
    same = family.decode(cond["y"][:1].repeat(2, 1, 1, 1), {k: v[:1].repeat(2, *[1] * (v.ndim - 1)) for k, v in cond.items()})
    assert same.shape == (2, 4000) and not same.is_nested


def test_prior_sigmas_and_initial_latents():
    adapter = _adapter()
    family = adapter.family
    cond = family.encode(_items((16000,)) * 2, torch.device("cpu"))
    y, std = family.prior(cond)
    assert torch.equal(y, cond["y"]) and std == pytest.approx(0.487 / 2**0.5)
    x = family.init_latents(2, cond, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x.shape == y.shape and x.dtype == torch.float32
    assert float((x - y).std()) == pytest.approx(std, rel=0.02) and abs(float((x - y).mean())) < 0.01
    sigmas = family.sigmas(5)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.7575, 0.515, 0.2725, 0.03, 0.0]), atol=1e-6)


@pytest.mark.parametrize("group_size", [1, 4])
def test_samples_and_on_policy_ratio(group_size):
    adapter = _adapter()
    items = _items()
    rollout = adapter.sample(items, group_size, torch.Generator().manual_seed(0))
    assert [s.shape[0] for s in rollout.samples] == [4000] * group_size + [3000] * group_size
    assert all(torch.isfinite(s).all() for s in rollout.samples)
    assert rollout.mask.sum(1).tolist() == [2] * (2 * group_size)
    with torch.no_grad():
        scores = adapter.log_prob(rollout)
    ratio = torch.exp(scores.log_probs - rollout.log_probs)[rollout.mask]
    assert (ratio - 1).abs().max() < 1e-6
    evaluation = adapter.sample(items, 1, torch.Generator().manual_seed(0), evaluate=True)
    assert not evaluation.mask.any() and evaluation.samples[1].shape == (3000,)


def test_prompts_the_family_cannot_read_are_one_line(tmp_path):
    from mmgrpo.config import ConfigError

    adapter = _adapter()
    with pytest.raises(ConfigError, match="prompt 1.*'noisy'"):
        adapter.check_prompts([_items()[0], {"prompt": "no audio"}])
    with pytest.raises(ConfigError, match="prompt 0.*mono"):
        adapter.check_prompts([{"prompt": "stereo", "noisy": np.zeros((2, 4000), np.float32)}])
    with pytest.raises(ConfigError, match="does not exist"):
        adapter.check_prompts([{"prompt": "file", "noisy": str(tmp_path / "missing.wav")}])
    with pytest.raises(ValueError, match="multiple of 16"):
        _adapter(num_frames=20)


def test_save_load_round_trip_and_flow_adapter_path(tmp_path):
    import soundfile as sf

    enhancer = SpeechEnhancer(tiny_unet(1, widths=(8, 16), patch=4), info={"note": "test"})
    enhancer.save_pretrained(tmp_path / "se")
    settings = json.loads((tmp_path / "se" / "speech.json").read_text())
    assert settings["velocity"]["class"] == "mmgrpo.pipelines.speech.model:SpeechVelocity"
    assert (tmp_path / "se" / "velocity" / "config.json").is_file()  # the UNet's own save_pretrained
    loaded = SpeechEnhancer.from_pretrained(tmp_path / "se")
    assert loaded.s_max == enhancer.s_max and loaded.stft == enhancer.stft and loaded.info == {"note": "test"}
    x, y, t = torch.randn(2, 2, 256, 16), torch.randn(2, 2, 256, 16), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, y, t), enhancer.velocity(x, y, t))
    options = dict(kernel="ode", num_steps=3, eval_steps=3, finetune="full")
    by_path = FlowAdapter(path=str(tmp_path / "se"), **options)
    by_object = FlowAdapter(enhancer, **options)
    a = by_path.sample(_items(), 1, torch.Generator().manual_seed(3), evaluate=True).samples
    b = by_object.sample(_items(), 1, torch.Generator().manual_seed(3), evaluate=True).samples
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    wav = by_path.export(a[0], tmp_path / "000")
    assert wav.endswith(".wav") and (tmp_path / "000.png").is_file()
    audio, rate = sf.read(wav, dtype="float32")
    assert rate == 16000 and audio.shape == (4000,)
    with pytest.raises(FileNotFoundError, match="speech.json"):
        SpeechEnhancer.from_pretrained(tmp_path)


def test_flow_adapter_imports_speech_only_when_needed():
    code = ("import sys, mmgrpo.pipelines.flow.adapter, mmgrpo.pipelines.flow.families; "
            "print(any(m.startswith('mmgrpo.pipelines.speech') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_quick_pretraining_build_writes_a_loadable_folder(tmp_path):
    from mmgrpo.pretrain import audio, speech_corpus

    def tone(text, voice, speed, pitch):  # a stand-in synthesiser: no espeak-ng needed
        n = int(16000 * 0.3 * len(text.split()))
        return (0.3 * np.sin(2 * np.pi * (120 + pitch) * np.arange(n) / 16000)).astype(np.float32), 16000

    speech_corpus.build_corpus(tmp_path / "corpus", num_train=6, num_eval=3, seed=0, synthesise=tone)
    record = audio.main(["--quick", "--out", str(tmp_path / "se"), "--corpus", str(tmp_path / "corpus")])
    assert record["size_bytes"] < 10e6 and record["baseline"]["num_items"] == 2
    assert record["baseline"]["noisy"]["pesq"] is not None
    card = (tmp_path / "se" / "MODEL_CARD.md").read_text()
    assert "python -m mmgrpo.pretrain.audio --quick" in card and "PESQ" in card
    adapter = FlowAdapter(path=str(tmp_path / "se"), kernel="ode", num_steps=2, eval_steps=2)
    assert adapter.family_name == "speech"


def test_x0_prediction_starts_from_the_best_linear_estimate():
    from mmgrpo.pipelines.speech.model import x0_coefficients

    skip, scale = x0_coefficients(torch.tensor([1.0, 0.5, 1e-6]), 0.07, 0.487 / 2**0.5)  # the defaults
    assert skip[0] == 0 and scale[0] == pytest.approx(0.07) and skip[2] == pytest.approx(1, abs=1e-4)
    assert scale[2] < 1e-6 and 0 < skip[1] < 1
    velocity = tiny_unet(0, widths=(8, 16), prediction="x0")
    torch.nn.init.zeros_(velocity.unet.conv_out.weight)
    torch.nn.init.zeros_(velocity.unet.conv_out.bias)  # the UNet's output is 0: x0_hat = y + skip (x - y)
    x, y = torch.randn(2, 2, 256, 16), torch.randn(2, 2, 256, 16)
    t = torch.tensor([1.0, 0.5])
    with torch.no_grad():
        v = velocity(x, y, t)
    assert torch.allclose(v[0], x[0] - y[0], atol=1e-6)  # at t = 1 the clean estimate is y itself
    assert torch.allclose(v[1], (x[1] - y[1]) * (1 - skip[1]) / 0.5, atol=1e-5)
