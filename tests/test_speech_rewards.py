"""Speech rewards (rewards/speech.py): PESQ, ESTOI, SI-SDR, DNSMOS and the weighted SpeechQuality.

Test speech is synthesised (harmonics of a gliding f0 under formant-like peaks, cut into syllables),
so no espeak-ng or corpus is needed; DNSMOS's clean-versus-noisy check reads a committed espeak clip.
"""

from __future__ import annotations

import doctest
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pesq")
pytest.importorskip("pystoi")
soundfile = pytest.importorskip("soundfile")

from mmgrpo.rewards import speech  # noqa: E402
from mmgrpo.rewards.speech import DNSMOS, ESTOI, PESQ, SISDR, SpeechQuality, si_sdr  # noqa: E402

RATE = 16000
CORPUS = Path(__file__).resolve().parents[1] / "assets" / "speech_corpus"


def speechlike(seconds: float = 2.0, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A voiced, syllabic test signal [L] float32 with peak 0.5 and a pause in the middle."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 * (1 + 0.15 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))  # intonation
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = rng.uniform([500, 1200, 2400], [800, 1800, 3000])
    x = np.zeros_like(t)
    for k in range(1, 40):
        fk = k * f0
        gain = sum(np.exp(-(((fk - f) / 150.0) ** 2)) for f in formants) + 0.05
        x += gain * np.sin(k * phase) * (fk < rate / 2 - 500)
    x *= np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.6  # syllables
    x[(t > seconds * 0.45) & (t < seconds * 0.55)] = 0.0
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def with_noise(clean: np.ndarray, snr_db: float, seed: int = 1, orthogonal: bool = False) -> np.ndarray:
    """clean + zero-mean white noise scaled to exactly `snr_db` (energy ratio against the zero-mean clean)."""
    s = clean.astype(np.float64) - clean.mean()
    noise = np.random.default_rng(seed).standard_normal(len(clean))
    noise -= noise.mean()
    if orthogonal:
        noise -= np.dot(noise, s) / np.dot(s, s) * s
    noise *= math.sqrt(np.dot(s, s) / np.dot(noise, noise) / 10 ** (snr_db / 10))
    return clean.astype(np.float64) + noise


def rows(clean, n: int, rate: int = RATE) -> list[dict]:
    return [{"prompt": f"row {i}", "clean": clean, "sample_rate": rate} for i in range(n)]


CLEAN = speechlike()
NOISY = with_noise(CLEAN, 5.0)


# ---------------------------------------------------------------------------- SI-SDR closed form


def test_si_sdr_matches_closed_forms():
    assert si_sdr(0.3 * CLEAN, CLEAN) > 100  # a scaled copy: only rounding error is left
    exact = with_noise(CLEAN, 7.0, orthogonal=True)
    assert si_sdr(exact, CLEAN) == pytest.approx(7.0, abs=1e-6)  # noise orthogonal to s: SI-SDR = SNR exactly
    for snr in (-5.0, 0.0, 10.0, 20.0):
        assert si_sdr(with_noise(CLEAN, snr, seed=3), CLEAN) == pytest.approx(snr, abs=0.1)
    noisy = with_noise(CLEAN, 3.0)
    assert si_sdr(4.0 * noisy + 0.1, CLEAN) == pytest.approx(si_sdr(noisy, CLEAN), abs=1e-9)  # scale, offset


def test_si_sdr_reward_reads_tensors_and_prompt_fields():
    samples = [torch.from_numpy(CLEAN), torch.from_numpy(NOISY).float()[None]]  # [L] and [1, L]
    out = SISDR(workers=0)(samples, ["a", "b"], clean=[CLEAN, CLEAN], sample_rate=[RATE, RATE])
    assert out[0] > 100 and out[1] == pytest.approx(5.0, abs=0.1)


# ---------------------------------------------------------------------------- PESQ / ESTOI


def test_pesq_and_estoi_rank_clean_above_noisy():
    pesq = PESQ(workers=0)([CLEAN, NOISY], rows(CLEAN, 2))
    estoi = ESTOI(workers=0)([CLEAN, NOISY], rows(CLEAN, 2))
    assert pesq[0] > 4.4 and 1.0 < pesq[1] < pesq[0] - 1
    assert estoi[0] == pytest.approx(1.0, abs=1e-6) and estoi[1] < estoi[0] - 0.1


@pytest.mark.parametrize("reward", [PESQ, ESTOI, SISDR], ids=["pesq", "estoi", "si_sdr"])
def test_unscorable_rows_are_none(reward):
    short = CLEAN[: RATE // 10]  # 0.1 s
    nan = CLEAN.copy()
    nan[100] = np.nan
    inf = CLEAN.copy()
    inf[5] = np.inf
    silence = np.zeros_like(CLEAN)
    samples = [CLEAN, short, nan, inf, silence, CLEAN]
    prompts = rows(CLEAN, 5) + [{"prompt": "silent reference", "clean": silence}]
    prompts[1] = {"prompt": "short", "clean": short}
    out = reward(workers=0)(samples, prompts)
    assert out[0] is not None and math.isfinite(out[0])
    assert out[1:] == [None] * 5


def test_library_failures_become_none(monkeypatch):
    import pesq as pesq_lib

    short = CLEAN[: RATE // 10]
    # below the guard, the libraries themselves refuse: PESQ BufferTooShortError, pystoi's 1e-5 fallback
    assert PESQ(workers=0, min_seconds=0)([short], rows(short, 1)) == [None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pystoi's warning is consumed, not leaked
        assert ESTOI(workers=0, min_seconds=0)([short], rows(short, 1)) == [None]
    for failure in (pesq_lib.NoUtterancesError("no utterances"), pesq_lib.BufferTooShortError("short"), ValueError()):

        def failing(*args, error=failure, **kwargs):
            raise error

        monkeypatch.setattr(pesq_lib, "pesq", failing)
        assert PESQ(workers=0)([NOISY], rows(CLEAN, 1)) == [None]
    monkeypatch.setattr(pesq_lib, "pesq", lambda *args, **kwargs: -7.0)  # an error code
    assert PESQ(workers=0)([NOISY], rows(CLEAN, 1)) == [None]


def test_8khz_rows_use_narrow_band_and_other_rates_are_resampled():
    clean8 = speechlike(rate=8000)
    noisy8 = with_noise(clean8, 5.0)
    nb = PESQ(workers=0)([clean8, noisy8], rows(clean8, 2, rate=8000))
    assert nb[0] > 4.0 and nb[1] < nb[0] - 1  # P.862.1's range tops out at 4.55
    estoi8 = ESTOI(workers=0)([clean8, noisy8], rows(clean8, 2, rate=8000))
    assert estoi8[0] == pytest.approx(1.0, abs=1e-6) and estoi8[1] < 0.9
    clean22 = speechlike(rate=22050)
    wb = PESQ(workers=0)([clean22, with_noise(clean22, 5.0)], rows(clean22, 2, rate=22050))
    assert wb[0] > 4.4 and wb[1] < wb[0] - 1


def test_clean_reference_from_files(tmp_path):
    soundfile.write(tmp_path / "clean.flac", CLEAN, RATE, subtype="PCM_16")
    soundfile.write(tmp_path / "clean22.wav", speech.resample(CLEAN, RATE, 22050), 22050, subtype="FLOAT")
    soundfile.write(tmp_path / "stereo.wav", np.stack([CLEAN, CLEAN], 1), RATE)
    from_array = PESQ(workers=0)([NOISY], rows(CLEAN, 1))[0]
    from_file = PESQ(workers=0)([NOISY], rows(str(tmp_path / "clean.flac"), 1))[0]
    assert from_file == pytest.approx(from_array, abs=0.02)  # 16-bit quantisation only
    resampled = SISDR(workers=0)([CLEAN], rows(tmp_path / "clean22.wav", 1))[0]  # 22.05 kHz file -> 16 kHz row
    assert resampled > 25
    with pytest.raises(ValueError, match=r"^estoi: clean reference of row 0 '.*stereo.wav' has 2 channels"):
        ESTOI(workers=0)([CLEAN], rows(str(tmp_path / "stereo.wav"), 1))


@pytest.mark.parametrize("reward", [PESQ, ESTOI, SISDR, DNSMOS, SpeechQuality], ids=lambda r: r.__name__)
def test_stereo_samples_are_one_clear_line(reward):
    stereo = torch.from_numpy(np.stack([CLEAN, CLEAN]))  # [2, L]
    instance = reward(workers=0)
    with pytest.raises(ValueError) as info:
        instance([CLEAN, stereo], rows(CLEAN, 2))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{instance.__name__}: sample 1 has shape [2, {len(CLEAN)}]") and "mono" in message


def test_rows_without_clean_are_unscored_with_one_warning():
    reward = SISDR(workers=0)
    with pytest.warns(UserWarning, match="prompt 1 has no 'clean' reference"):
        out = reward([CLEAN, CLEAN, CLEAN], [{"prompt": "a", "clean": CLEAN}, "no reference", {"prompt": "c"}])
    assert out[0] > 100 and out[1:] == [None, None]


def test_process_pool_keeps_order():
    samples = [with_noise(CLEAN, snr, seed=k) for k, snr in enumerate((-5, 20, 0, 15, 5, 10))]
    pooled = SISDR(workers=2)(samples, rows(CLEAN, len(samples)))  # SI-SDR only: workers need no scipy/pesq
    assert pooled == pytest.approx(SISDR(workers=0)(samples, rows(CLEAN, len(samples))), abs=1e-9)
    assert pooled == pytest.approx([-5, 20, 0, 15, 5, 10], abs=0.1)


# ---------------------------------------------------------------------------- SpeechQuality


def test_speech_quality_is_the_documented_weighted_mix():
    reward = SpeechQuality(weights={"si_sdr": 2.0}, workers=0)
    silence = np.zeros_like(CLEAN)
    out = reward([CLEAN, NOISY, silence], rows(CLEAN, 3))
    assert set(out) == {"score", "pesq", "estoi", "si_sdr"}
    for i in range(2):
        p, e, s = out["pesq"][i], out["estoi"][i], out["si_sdr"][i]
        expected = ((p - 1) / 3.5 + e + 2 * (min(max(s, -10), 30) + 10) / 40) / 4
        assert out["score"][i] == pytest.approx(expected)
    assert out["score"][0] > out["score"][1] + 0.2
    assert [out[k][2] for k in out] == [None] * 4  # an unscored metric leaves the row unscored
    with pytest.raises(ValueError, match="unknown metric 'pesk' in weights"):
        SpeechQuality(weights={"pesk": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        SpeechQuality(weights={"pesq": 0, "estoi": 0, "si_sdr": 0})


# ---------------------------------------------------------------------------- DNSMOS


def clean_utterance() -> np.ndarray:
    """An espeak-ng utterance from the committed corpus (1.024 s, 16 kHz)."""
    files = sorted((CORPUS / "eval").glob("*.flac"))
    if not files:
        pytest.skip("assets/speech_corpus/ is not built")
    audio, rate = soundfile.read(files[0], dtype="float32")
    assert rate == RATE
    return audio


def test_dnsmos_scores_clean_speech_above_noisy_and_skips_unscorable_rows():
    pytest.importorskip("speechmos")
    clean = clean_utterance()
    noisy = np.clip(with_noise(clean, 0.0), -1, 1)
    short, nan = clean[: RATE // 10], clean.copy()
    nan[3] = np.nan
    out = DNSMOS(workers=2)([clean, noisy, np.zeros_like(clean), short, nan], [f"row {i}" for i in range(5)])
    assert set(out) == {"score", "sig", "bak", "ovrl"} and out["score"] == out["ovrl"]
    assert out["ovrl"][0] > out["ovrl"][1] + 0.3 and out["bak"][0] > out["bak"][1] + 1
    assert all(1 <= out[k][i] <= 5 for k in ("sig", "bak", "ovrl") for i in range(2))
    assert out["ovrl"][2:] == [None] * 3


def test_dnsmos_matches_speechmos_on_a_one_window_clip():
    pytest.importorskip("speechmos")
    from speechmos.dnsmos import DNSMOS as SpeechmosDNSMOS

    clip = speechlike(seconds=9.5, seed=4)  # >= 9.01 s and < 10.01 s: the official script uses one window
    ours = speech.dnsmos_scores(clip, hops=None, p808=True)
    model = speech.dnsmos_model(False)
    theirs = SpeechmosDNSMOS.__call__(model, clip, RATE, False)
    for key in ("sig", "bak", "ovrl", "p808"):
        assert ours[key] == pytest.approx(float(theirs[f"{key}_mos"]), abs=1e-5)
    assert len(speech.dnsmos_windows(speechlike(seconds=1.0), hops=None)) == 7  # 1 s tiled to 16 s
    assert len(speech.dnsmos_windows(speechlike(seconds=1.0), hops=1)) == 1


# ---------------------------------------------------------------------------- wiring


def test_registry_names_and_extra():
    from mmgrpo.registry import EXTRAS, REWARDS, resolve

    builtins = {"pesq": PESQ, "estoi": ESTOI, "si_sdr": SISDR, "dnsmos": DNSMOS, "speech_quality": SpeechQuality}
    for name, cls in builtins.items():
        assert resolve(name, REWARDS, "reward") is cls and cls(workers=0).__name__ == name
        assert EXTRAS[name] == "audio"


def test_trainer_scoring_sees_every_metric_and_nan_for_unscored_rows():
    from mmgrpo.config import RewardConfig
    from mmgrpo.scoring import build_rewards, score_rollout

    fns = build_rewards([RewardConfig("speech_quality", 1.0, {"weights": {"si_sdr": 2.0}}), RewardConfig("pesq", 0.0)])
    clean = torch.from_numpy(CLEAN)
    samples = [clean, torch.from_numpy(NOISY).float(), torch.full_like(clean, float("nan"))]
    prompts = [{"prompt": f"utterance {i}", "noisy": NOISY, "clean": CLEAN, "sample_rate": RATE} for i in range(3)]
    components, subs = score_rollout(fns, samples, prompts)  # [3, 2]
    assert sorted(subs) == ["speech_quality/estoi", "speech_quality/pesq", "speech_quality/si_sdr"]
    assert components[0, 0] > components[1, 0] and components[:2].isfinite().all()
    assert components[2].isnan().all() and all(v[2].isnan() for v in subs.values())
    assert subs["speech_quality/pesq"][:2].tolist() == components[:2, 1].tolist()


def test_doctest():
    assert doctest.testmod(speech).failed == 0
