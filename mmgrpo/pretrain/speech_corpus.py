"""Build the embedded clean-speech corpus (assets/speech_corpus/): short espeak-ng utterances as FLAC.

    python -m mmgrpo.pretrain.speech_corpus                    # the shipped corpus (seconds; needs espeak-ng)
    python -m mmgrpo.pretrain.speech_corpus --quick --out DIR  # 8 + 4 utterances (a smoke build)

espeak-ng is needed for this build only (`apt-get install -y espeak-ng`); training and the tests read the
committed FLAC files with soundfile. Each utterance is a phrase of 2-3 words, deterministic from the seed,
spoken by an espeak-ng voice ("en-us+f3": accent + variant) at a drawn speed and pitch, resampled from
22.05 kHz to 16 kHz (scipy's polyphase filter), trimmed of leading and trailing silence, placed at a small
random onset in exactly 16384 samples (1.024 s: 129 STFT frames at hop 128), peak-normalised to 0.9 and
written as 16-bit FLAC. Held-out ("eval") utterances use words, voice variants and accents that no
training utterance uses, so a held-out score measures unseen speakers saying unseen words.

Output: train/NNNN.flac, eval/NNNN.flac, manifest.jsonl (one line per file: file, split, index, text,
voice, speed, pitch, onset, offset; onset/offset bound the speech in samples), build.json and DATA_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
NUM_SAMPLES = 16384  # 1.024 s: 129 frames at hop 128 (the speech family pads frames to a multiple of 16)
PEAK = 0.9
MAX_ONSET = 1600  # at most 0.1 s of silence before the speech
SILENCE_FRACTION = 0.02  # trimming threshold: 2% of the peak (-34 dB)
MARGIN = 160  # 10 ms kept on each side of the trimmed speech
SPEED_RANGE = (140, 190)  # espeak-ng -s, words per minute
PITCH_RANGE = (25, 75)  # espeak-ng -p, 0-99
SPEED_STEP = 25  # a phrase too long for the clip is spoken again this much faster
ESPEAK_HINT = "espeak-ng is not installed: apt-get update && apt-get install -y espeak-ng (needed for this build only)"

# Voices: accent + variant. The eval split's variants and its two extra accents never occur in training.
VOICES = {
    "train": [f"{accent}+{variant}" for accent in ("en-us", "en-gb", "en-gb-scotland", "en-029")
              for variant in ("m1", "m3", "m5", "m7", "f1", "f3", "f5", "klatt")],
    "eval": [f"{accent}+{variant}" for accent in ("en-gb-x-rp", "en-gb-x-gbcwmd", "en-us")
             for variant in ("m2", "m4", "m6", "f2", "f4", "klatt2")],
}

WORDS = """
apple river table green window garden yellow orange silver paper summer winter morning evening simple
happy little water music number letter pencil basket bottle button candle carpet castle circle cloudy
cotton doctor dragon engine farmer finger flower forest friendly golden guitar hammer harbor honey
island jacket kettle kitchen ladder lemon lion market meadow mirror monkey mountain needle ocean orchard
painter pepper pillow planet pocket puzzle rabbit rocket saddle salmon shadow silent sister spider
station stone sugar sunny tiger tomato tower travel turtle valley velvet village violet wagon walnut
winter wooden blanket bridge butter cabin camera cherry coffee copper desert dinner falcon feather
ginger harvest helmet lantern marble meadow nickel parrot pebble pirate quiet ribbon robin sandal
signal spoon storm thunder ticket timber tunnel under velvet whistle yellow zebra bright cold early
fast gentle heavy late narrow rapid round small soft sweet warm wild brave calm clever eager fair
""".split()


def split_words(words: list[str]) -> dict[str, list[str]]:
    """Disjoint vocabularies: every fifth distinct word (sorted) is held out for the eval split."""
    distinct = sorted(set(words))
    return {"train": [w for i, w in enumerate(distinct) if i % 5], "eval": distinct[::5]}


def phrase(rng: np.random.Generator, vocabulary: list[str]) -> str:
    """1-3 distinct words (mostly 2): up to about a second of speech at espeak-ng's speeds."""
    count = int(rng.choice([1, 2, 3], p=[0.15, 0.6, 0.25]))
    return " ".join(vocabulary[i] for i in rng.choice(len(vocabulary), size=count, replace=False))


def espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """One utterance from espeak-ng: (float32 waveform [N], its sample rate, 22050)."""
    import soundfile as sf

    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SystemExit(ESPEAK_HINT)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "utterance.wav"
        subprocess.run([binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True)
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate  # [N]


def to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """Polyphase resampling to 16 kHz (float64 inside, float32 out)."""
    from math import gcd

    from scipy.signal import resample_poly

    if rate == SAMPLE_RATE:
        return audio.astype(np.float32)
    g = gcd(SAMPLE_RATE, rate)
    return resample_poly(audio.astype(np.float64), SAMPLE_RATE // g, rate // g).astype(np.float32)


def trim_silence(audio: np.ndarray) -> np.ndarray:
    """The span from the first to the last sample above 2% of the peak, with 10 ms kept on each side."""
    loud = np.nonzero(np.abs(audio) > SILENCE_FRACTION * np.abs(audio).max())[0]
    if loud.size == 0:
        raise ValueError("trim_silence: the utterance is silent")
    start, stop = max(int(loud[0]) - MARGIN, 0), min(int(loud[-1]) + 1 + MARGIN, audio.size)
    return audio[start:stop]


def place(speech: np.ndarray, onset: int) -> np.ndarray:
    """The speech at `onset` in exactly NUM_SAMPLES samples of silence, peak-normalised to PEAK."""
    if onset + speech.size > NUM_SAMPLES:
        raise ValueError(f"place: {speech.size} samples at onset {onset} exceed {NUM_SAMPLES}")
    clip = np.zeros(NUM_SAMPLES, np.float32)  # [L]
    clip[onset : onset + speech.size] = speech
    return (clip * (PEAK / np.abs(clip).max())).astype(np.float32)


Synthesiser = Callable[[str, str, int, int], tuple[np.ndarray, int]]


def utterance(rng: np.random.Generator, vocabulary: list[str], voices: list[str],
              synthesise: Synthesiser) -> tuple[np.ndarray, dict[str, Any]]:
    """One clip [NUM_SAMPLES] and its manifest fields. A phrase too long for the clip is spoken faster
    (up to 2 times), then another phrase is drawn."""
    voice = voices[int(rng.integers(len(voices)))]
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    for _ in range(10):
        text = phrase(rng, vocabulary)
        speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
        for attempt in range(3):
            audio, rate = synthesise(text, voice, speed + attempt * SPEED_STEP, pitch)
            speech = trim_silence(to_16k(audio, rate))
            if speech.size <= NUM_SAMPLES:
                onset = int(rng.integers(0, min(NUM_SAMPLES - speech.size, MAX_ONSET) + 1))
                fields = {"text": text, "voice": voice, "speed": speed + attempt * SPEED_STEP, "pitch": pitch,
                          "onset": onset, "offset": onset + int(speech.size)}
                return place(speech, onset), fields
    raise ValueError(f"utterance: voice {voice} spoke no phrase within {NUM_SAMPLES} samples in 10 tries")


def build_corpus(out: str | Path, num_train: int = 240, num_eval: int = 48, seed: int = 0,
                 synthesise: Synthesiser = espeak, command: str = "") -> dict[str, Any]:
    """Write the corpus into `out` (replacing an earlier one there); returns the build record."""
    import soundfile as sf

    started = time.time()
    out = Path(out)
    for stale in [*out.glob("train/*.flac"), *out.glob("eval/*.flac")]:  # an earlier, maybe larger, build's
        stale.unlink()
    vocabularies = split_words(WORDS)
    lines = []
    for split_code, (split, count) in enumerate((("train", num_train), ("eval", num_eval))):
        (out / split).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, split_code])
        texts: set[str] = set()
        for index in range(count):
            clip, fields = utterance(rng, vocabularies[split], VOICES[split], synthesise)
            while fields["text"] in texts:  # distinct texts within a split
                clip, fields = utterance(rng, vocabularies[split], VOICES[split], synthesise)
            texts.add(fields["text"])
            name = f"{split}/{index:04d}.flac"
            sf.write(out / name, clip, SAMPLE_RATE, subtype="PCM_16")
            lines.append({"file": name, "split": split, "index": index, **fields})
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    files = [*out.glob("train/*.flac"), *out.glob("eval/*.flac")]
    record = {
        "command": command, "seed": seed, "num_train": num_train, "num_eval": num_eval,
        "sample_rate": SAMPLE_RATE, "num_samples": NUM_SAMPLES, "peak": PEAK,
        "voices": VOICES, "words": {k: len(v) for k, v in vocabularies.items()},
        "size_bytes": sum(f.stat().st_size for f in files), "seconds": round(time.time() - started, 1),
        "synthesiser": _espeak_version() if synthesise is espeak else getattr(synthesise, "__name__", "custom"),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
    }
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "DATA_CARD.md").write_text(data_card(record))
    print(f"[speech_corpus] {num_train} + {num_eval} utterances, {record['size_bytes'] / 1e6:.2f} MB, "
          f"{record['seconds']} s -> {out}", flush=True)
    return record


def _espeak_version() -> str:
    result = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False)
    return result.stdout.split("Data at")[0].strip()


def data_card(record: dict[str, Any]) -> str:
    """DATA_CARD.md from the build record (so the card always says what was built)."""
    voices = record["voices"]
    return f"""# Embedded clean-speech corpus (assets/speech_corpus/)

Built by `{record['command'] or 'python -m mmgrpo.pretrain.speech_corpus'}` (seed {record['seed']}) with
`mmgrpo/pretrain/speech_corpus.py` and {record['synthesiser']}, on {record['date']}. The build needs
espeak-ng (`apt-get update && apt-get install -y espeak-ng`); training and tests only read these files.

- What: {record['num_train']} training and {record['num_eval']} held-out utterances of 1-3 English words (mostly 2)
  (synthetic speech, no recordings of people), 16 kHz mono, exactly {record['num_samples']} samples
  ({record['num_samples'] / record['sample_rate']:.3f} s) each, peak {record['peak']}, 16-bit FLAC.
- Held out: the eval split uses its own words ({record['words']['eval']} words; training uses the other
  {record['words']['train']}), its own voice variants and two accents training never hears
  ({len(voices['train'])} training voices, {len(voices['eval'])} held-out voices, no voice in both).
- How: espeak-ng at 140-190 words per minute (faster when a phrase does not fit) and pitch 25-75,
  22.05 kHz -> 16 kHz polyphase resampling (scipy), silence trimmed at 2% of the peak with 10 ms margins,
  the speech placed at a random onset of at most 0.1 s, then zeros to the fixed length.
- Files: `train/NNNN.flac`, `eval/NNNN.flac`, `manifest.jsonl` (file, split, index, text, voice, speed,
  pitch, onset, offset: the speech span in samples), `build.json` (this record).
- Size: {record['size_bytes'] / 1e6:.2f} MB of FLAC. Build time: {record['seconds']} s on a 2-core CPU.
  The same seed and espeak-ng version rebuild byte-identical FLAC files and manifest (checked for the
  shipped corpus); another espeak-ng version may pronounce differently.
- Use: `mmgrpo.miniworld.speech` mixes these utterances with generated noises (white, pink, brown,
  babble of other utterances of the same split, hum, clicks) at -5 to 15 dB SNR, with noise seeds of
  the held-out items in their own range; the prompt set `speech` (data.source) gives noisy/clean
  pairs. `tests/test_speech_data.py` checks the corpus and the mixing. Limits: espeak-ng speech is formant-synthesised and
  cleaner and more regular than human speech; scores on it say little about real recordings.
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m mmgrpo.pretrain.speech_corpus",
                                     description="Build the embedded clean-speech corpus with espeak-ng.")
    parser.add_argument("--out", default=None, help="output folder (default: the package's assets/speech_corpus)")
    parser.add_argument("--quick", action="store_true", help="8 training and 4 held-out utterances (a smoke build)")
    parser.add_argument("--num-train", type=int, default=240)
    parser.add_argument("--num-eval", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        raise SystemExit(ESPEAK_HINT)
    if args.out is None:
        from mmgrpo import assets

        args.out = str(Path(assets.__file__).parent / "speech_corpus")
    num_train, num_eval = (8, 4) if args.quick else (args.num_train, args.num_eval)
    options = [("--quick", args.quick), (f"--num-train {args.num_train}", args.num_train != 240 and not args.quick),
               (f"--num-eval {args.num_eval}", args.num_eval != 48 and not args.quick), (f"--seed {args.seed}", args.seed)]
    command = " ".join(["python -m mmgrpo.pretrain.speech_corpus"] + [text for text, used in options if used])
    return build_corpus(args.out, num_train, num_eval, seed=args.seed, command=command)


if __name__ == "__main__":
    main()
