"""Mini-world speech: noisy/clean pairs from the embedded clean corpus and deterministic noises.

The clean utterances are the committed espeak-ng corpus (assets/speech_corpus/, built by
`python -m mmgrpo.pretrain.speech_corpus`): 1.024 s, 16 kHz mono, split into "train" and "eval"
with disjoint words and voices. Noises are generated from integer seeds:

    white   Gaussian, flat spectrum
    pink    power ~ 1/f (spectral shaping of white noise)
    brown   power ~ 1/f^2 (flat below 20 Hz, so the clip is not one slow drift)
    babble  4-7 other utterances of the SAME split, circularly shifted, at random gains
    hum     mains hum: 50 or 60 Hz and up to 8 harmonics with decaying amplitudes and a slow drift
    clicks  sparse decaying impulses (10-40 per second), like crackle on a line

`mix_at_snr` scales the noise so that 10 log10(sum clean^2 / sum noise^2) over the whole clip is the
requested SNR (in float64, exact to float32 rounding), then scales clean and noisy together if the mix
would exceed 0.99 (the SNR and the clean target stay consistent; nothing clips).

Held out means never seen in training: eval items use eval utterances only (babble included) and noise
seeds from their own range (train [0, 1e12), eval [1e12, 2e12)), so no noise waveform of the eval set is
ever generated for training. `speech_prompts` is the `speech` prompt set of data.source.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
NOISES = ("white", "pink", "brown", "babble", "hum", "clicks")
SPLITS = ("train", "eval")
NOISE_SEED_OFFSETS = {"train": 0, "eval": 10**12}  # noise seeds: train [0, 1e12), eval [1e12, 2e12)
MAX_ITEMS = 10**6  # per split and seed: noise seed = offset + seed * MAX_ITEMS + index
MAX_PEAK = 0.99
_NOISE_CODES = {name: code for code, name in enumerate(NOISES, start=1)}
_ITEM_CODE, _ORDER_CODE = 101, 102


# ----------------------------------------------------------------------------- corpus


def load_corpus(split: str, corpus: str | Path | None = None) -> list[dict[str, Any]]:
    """The clean utterances of one split, in manifest order: dicts of the manifest fields plus "audio"
    (float32 [L], read-only: copy before changing it). `corpus`: a folder with the same layout
    (manifest.jsonl + FLAC files); default: the embedded assets/speech_corpus."""
    if split not in SPLITS:
        raise ValueError(f"load_corpus: unknown split {split!r}; use 'train' or 'eval'")
    if corpus is None:
        from mmgrpo.assets import asset_path

        corpus = asset_path("speech_corpus")
    return [dict(record) for record in _read_corpus(str(Path(corpus).resolve())) if record["split"] == split]


@functools.lru_cache(maxsize=4)
def _read_corpus(folder: str) -> tuple[dict[str, Any], ...]:
    try:
        import soundfile as sf
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the speech corpus is read with soundfile, which is not installed: "
                                  "pip install 'mmgrpo[audio]'", name=e.name) from None

    manifest = Path(folder) / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"speech corpus {folder} has no manifest.jsonl: build one with "
                                f"python -m mmgrpo.pretrain.speech_corpus --out {folder}")
    records = []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        audio, rate = sf.read(Path(folder) / record["file"], dtype="float32")
        if rate != SAMPLE_RATE or audio.ndim != 1:
            raise ValueError(f"speech corpus {manifest} line {number}: {record['file']} is not 16 kHz mono "
                             f"({rate} Hz, shape {audio.shape})")
        audio.flags.writeable = False
        records.append({**record, "audio": audio})
    return tuple(records)


# ----------------------------------------------------------------------------- noises


def make_noise(kind: str, length: int, seed: int, *, sample_rate: int = SAMPLE_RATE,
               talkers: Sequence[np.ndarray] = ()) -> np.ndarray:
    """A noise of `kind` (see NOISES), float32 [length] at unit RMS, deterministic from `seed`.

    babble needs `talkers` (at least 2 clean utterances to mix, none of them the target speech).
    """
    if kind not in _NOISE_CODES:
        raise ValueError(f"make_noise: unknown noise {kind!r}; use one of {NOISES}")
    rng = np.random.default_rng([_NOISE_CODES[kind], int(seed)])
    if kind == "white":
        noise = rng.standard_normal(length)
    elif kind in ("pink", "brown"):
        noise = _coloured(rng, length, sample_rate, exponent=1.0 if kind == "pink" else 2.0)
    elif kind == "babble":
        noise = _babble(rng, length, talkers)
    elif kind == "hum":
        noise = _hum(rng, length, sample_rate)
    else:
        noise = _clicks(rng, length, sample_rate)
    return (noise / np.sqrt(np.mean(noise**2))).astype(np.float32)  # [L]


def _coloured(rng: np.random.Generator, length: int, sample_rate: int, exponent: float) -> np.ndarray:
    """White noise shaped to power ~ 1/f^exponent (no DC; flat below 20 Hz)."""
    spectrum = np.fft.rfft(rng.standard_normal(length))  # [L//2+1]
    freqs = np.fft.rfftfreq(length, 1.0 / sample_rate)  # [L//2+1]
    gain = np.maximum(freqs, 20.0) ** (-exponent / 2)
    gain[0] = 0.0
    return np.fft.irfft(spectrum * gain, n=length)


def _babble(rng: np.random.Generator, length: int, talkers: Sequence[np.ndarray]) -> np.ndarray:
    if len(talkers) < 2:
        raise ValueError("make_noise: babble needs at least 2 talkers (other clean utterances)")
    count = min(int(rng.integers(4, 8)), len(talkers))
    noise = np.zeros(length)
    for index in rng.choice(len(talkers), size=count, replace=False):
        voice = np.resize(np.asarray(talkers[index], np.float64), length)  # repeated to cover the clip
        voice = np.roll(voice, int(rng.integers(length)))
        noise += rng.uniform(0.5, 1.0) * voice / max(np.sqrt(np.mean(voice**2)), 1e-12)
    return noise


def _hum(rng: np.random.Generator, length: int, sample_rate: int) -> np.ndarray:
    t = np.arange(length) / sample_rate
    base = rng.choice([50.0, 60.0]) * (1 + rng.uniform(-0.005, 0.005))
    drift = 1 + 0.002 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * base * np.cumsum(drift) / sample_rate  # [L]
    decay = rng.uniform(0.4, 0.8)
    noise = np.zeros(length)
    for harmonic in range(1, int(rng.integers(3, 9)) + 1):
        amplitude = decay ** (harmonic - 1) * rng.uniform(0.5, 1.0)
        noise += amplitude * np.sin(harmonic * phase + rng.uniform(0, 2 * np.pi))
    return noise


def _clicks(rng: np.random.Generator, length: int, sample_rate: int) -> np.ndarray:
    count = max(1, int(rng.uniform(10, 40) * length / sample_rate))
    noise = np.zeros(length)
    for start in rng.integers(0, length, size=count):
        decay = rng.uniform(0.0005, 0.004) * sample_rate  # samples
        span = min(int(6 * decay), length - start)
        burst = rng.standard_normal(span) * np.exp(-np.arange(span) / decay)
        noise[start : start + span] += np.exp(rng.uniform(np.log(0.2), 0.0)) * burst
    return noise


# ----------------------------------------------------------------------------- mixing


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    """10 log10(sum clean^2 / sum (noisy - clean)^2) over the whole clip, in float64."""
    clean64 = np.asarray(clean, np.float64)
    residual = np.asarray(noisy, np.float64) - clean64
    return float(10 * np.log10(np.sum(clean64**2) / np.sum(residual**2)))


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr: float) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean), float32 [L]: the noise scaled to `snr` dB against the clean clip, both scaled down
    together when the mix would peak above 0.99."""
    clean64, noise64 = np.asarray(clean, np.float64), np.asarray(noise, np.float64)
    if clean64.shape != noise64.shape or clean64.ndim != 1:
        raise ValueError(f"mix_at_snr: clean {clean64.shape} and noise {noise64.shape} must be equal 1-D shapes")
    clean_power, noise_power = np.mean(clean64**2), np.mean(noise64**2)
    if clean_power == 0 or noise_power == 0:
        raise ValueError("mix_at_snr: the clean clip or the noise is silent; no SNR is defined")
    noisy = clean64 + noise64 * np.sqrt(clean_power / (noise_power * 10 ** (snr / 10)))  # [L]
    scale = min(1.0, MAX_PEAK / np.abs(noisy).max())
    return (noisy * scale).astype(np.float32), (clean64 * scale).astype(np.float32)


# ----------------------------------------------------------------------------- prompt sets


def noise_seed(split: str, seed: int, index: int) -> int:
    """The noise seed of item `index`: disjoint ranges per split, and per `seed` within a split."""
    return NOISE_SEED_OFFSETS[split] + seed * MAX_ITEMS + index


def speech_item(split: str, index: int, *, snr_range: Sequence[float] = (-5, 15), noises: Sequence[str] = NOISES,
                seed: int = 0, corpus: str | Path | None = None) -> dict[str, Any]:
    """Item `index` of a split (see `speech_prompts` for the fields).

    The utterance cycles through a seeded permutation of the split's utterances, the noise kind cycles
    through `noises` (shifted by one on each pass over the utterances, so pairs vary), and the SNR is
    drawn uniformly from `snr_range` and rounded to 0.1 dB.
    """
    utterances = load_corpus(split, corpus)
    order = np.random.default_rng([_ORDER_CODE, SPLITS.index(split), seed]).permutation(len(utterances))
    position = int(order[index % len(utterances)])
    target = utterances[position]
    kind = noises[(index + index // len(utterances)) % len(noises)]
    rng = np.random.default_rng([_ITEM_CODE, SPLITS.index(split), seed, index])
    snr = round(float(rng.uniform(snr_range[0], snr_range[1])), 1)
    talkers = [u["audio"] for i, u in enumerate(utterances) if i != position] if kind == "babble" else ()
    seed_of_noise = noise_seed(split, seed, index)
    noise = make_noise(kind, target["audio"].size, seed_of_noise, talkers=talkers)
    noisy, clean = mix_at_snr(target["audio"], noise, snr)
    held_out = "held-out " if split == "eval" else ""
    return {
        "prompt": f"{held_out}utterance {target['index']} + {kind} at {snr:g} dB",
        "noisy": noisy,  # float32 [L]
        "clean": clean,  # float32 [L], same scale as the speech inside `noisy`
        "sample_rate": SAMPLE_RATE,
        "noise": kind,
        "snr_db": snr,
        "noise_seed": seed_of_noise,
        "utterance": target["file"],
        "text": target["text"],
    }


def speech_prompts(num_train: int = 480, num_eval: int = 48, snr_range: Sequence[float] = (-5, 15),
                   noises: Sequence[str] = NOISES, seed: int = 0,
                   corpus: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The `speech` prompt set for data.source: {"train": [...], "eval": [...]} of noisy/clean pairs.

    Items: {"prompt": "utterance 12 + babble at 5.3 dB" (eval: "held-out utterance ..."), "noisy":
    float32 [16384], "clean": float32 [16384], "sample_rate": 16000, "noise": kind, "snr_db": float,
    "noise_seed": int, "utterance": "train/0012.flac", "text": the words spoken}. Train items use
    training utterances and noise seeds only; eval items the held-out ones (module docstring).
    `corpus`: a folder laid out like assets/speech_corpus (default: the embedded corpus).
    """
    low, high = _snr_range(snr_range)
    unknown = [n for n in noises if n not in _NOISE_CODES]
    if unknown or not noises:
        raise ValueError(f"speech_prompts: unknown noise(s) {unknown}; use a non-empty list from {list(NOISES)}")
    for name, n in (("num_train", num_train), ("num_eval", num_eval)):
        if not 0 <= n <= MAX_ITEMS:
            raise ValueError(f"speech_prompts: {name} must be in [0, {MAX_ITEMS}], got {n}")
    if not 0 <= seed < MAX_ITEMS:
        raise ValueError(f"speech_prompts: seed must be in [0, {MAX_ITEMS}), got {seed}")
    return {
        name: [speech_item(split, i, snr_range=(low, high), noises=tuple(noises), seed=seed, corpus=corpus)
               for i in range(n)]
        for name, split, n in (("train", "train", num_train), ("eval", "eval", num_eval))
    }


def _snr_range(snr_range: Sequence[float]) -> tuple[float, float]:
    if len(snr_range) != 2 or not float(snr_range[0]) <= float(snr_range[1]):
        raise ValueError(f"speech_prompts: snr_range must be [low, high] in dB with low <= high, got {snr_range}")
    return float(snr_range[0]), float(snr_range[1])
