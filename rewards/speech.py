"""Speech-enhancement rewards: PESQ, ESTOI, SI-SDR (intrusive), DNSMOS (non-intrusive), and a weighted mix.

Samples are enhanced waveforms, one per row: float tensors or arrays [L] (or [1, L] / [L, 1]) in [-1, 1].
Intrusive metrics compare each sample with its clean reference, read from the prompt field `clean`
(a float array [L] at the row's rate, or a path to a WAV/FLAC file, which keeps its own rate). The
row's rate is the prompt field `sample_rate` (16000 when absent), or the reward's `sample_rate`
option when given (the rate of the samples for every row). A reference file at another rate is
resampled to the row's rate. Sample and reference are trimmed to their common length.

Metrics (each a pure function below; the reward classes batch and guard them):
- PESQ (ITU-T P.862.2 wide-band MOS-LQO, range about 1.04 .. 4.64) through the `pesq` package at
  16 kHz. 8 kHz rows get narrow-band P.862.1 (range 1.02 .. 4.55), since P.862.2 is not defined at
  8 kHz: numbers of the two modes are not comparable. Other rates are resampled to 16 kHz with
  torchaudio.functional.resample, then wide-band.
- ESTOI (Jensen & Taal 2016) through `pystoi` (`extended=True`; it resamples to 10 kHz itself).
- SI-SDR (Le Roux et al. 2019) in dB, closed form on zero-mean signals:
  alpha = <s_hat, s> / ||s||^2, SI-SDR = 10 log10(||alpha s||^2 / ||s_hat - alpha s||^2)
  (eps = float64 machine epsilon in both norms, as torchmetrics; a scaled copy scores ~+180 dB).
- DNSMOS P.835 SIG / BAK / OVRL (Reddy et al. 2022) through the ONNX models the `speechmos` wheel
  ships, run on onnxruntime (no download). The official script tiles a clip shorter than 9.01 s by
  doubling it, then averages the model over 9.01-s windows every 1 s; `hops` caps how many windows
  are averaged (default 1: a 1-s clip tiled to 16 s would otherwise cost 7 windows, ~0.5 s each on
  a CPU core, for scores within ~0.05 MOS of each other on a short tiled clip); hops=None is the
  official average. Rows at other rates are resampled to 16 kHz; values are clipped to [-1, 1]
  (speechmos rejects anything outside; this is what writing a 16-bit WAV does).

Unscored rows (None; the trainer turns them into NaN, leaves them out of group statistics and
counts them) - never a number that trains: a sample or reference with NaN/inf values, shorter than
`min_seconds` (0.25 s: PESQ's own minimum), or silent (peak below 1e-4, -80 dBFS); PESQ's
NoUtterancesError, BufferTooShortError and any other PesqError, its ValueError for a silent
processed signal, and negative (error-code) values; ESTOI's "not enough STFT frames" fallback
(pystoi warns and returns 1e-5); a row without a clean reference (intrusive metrics only).
Stereo input is an error: ValueError naming the reward, the row and the shape.

Speed (one CPU core, 3-s clip): PESQ ~25 ms, ESTOI ~15 ms, SI-SDR < 1 ms, DNSMOS ~0.5 s per window.
DNSMOS runs over a thread pool (`workers` threads; onnxruntime releases the GIL). PESQ's C code holds
the GIL, so threads cannot speed it up: intrusive metrics run in this process by default
(`workers=0`; ~40 ms per 1-s clip for all three) and over a pool of `workers` processes when asked
(forkserver, started once and reused; as with any non-fork start method, a script that trains must
keep its top level under `if __name__ == "__main__":`). Results keep the order of the samples.

`SpeechQuality` is the default training reward: single-metric PESQ training hacks fidelity
(FlowSE-GRPO), so it mixes normalised metrics and reports every metric as a sub-score:
    score = sum_k w_k n_k / sum_k w_k over metrics with w_k > 0, where
    n_pesq = (PESQ - 1) / 3.5,  n_estoi = ESTOI,  n_si_sdr = (clip(SI-SDR, -10, 30) + 10) / 40,
    n_dnsmos = (OVRL - 1) / 4    (each about 0 .. 1),
default weights pesq 1, estoi 1, si_sdr 1, dnsmos 0 (DNSMOS costs ~0.5 s per clip on a CPU core;
give it a weight, or with_dnsmos=True to only report it). A row where any weighted metric is
unscored is unscored. Sub-scores are the raw metrics: pesq, estoi, si_sdr (dB), and dnsmos_sig,
dnsmos_bak, dnsmos_ovrl when DNSMOS runs.

>>> import numpy as np
>>> t = np.arange(16000) / 16000
>>> clean = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) ** 2).astype(np.float32)
>>> noisy = clean + 0.03 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
>>> out = SISDR(workers=0)([clean, noisy], [{"prompt": "a", "clean": clean}] * 2)
>>> out[0] > 100, round(out[1])
(True, 13)
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RATE = 16000  # the project's speech rate; PESQ wide-band and DNSMOS need it
MIN_SECONDS = 0.25  # PESQ raises BufferTooShortError below this; used for every metric
SILENCE_PEAK = 1e-4  # -80 dBFS: below this peak a clip is silent
INTRUSIVE = ("pesq", "estoi", "si_sdr")
DNSMOS_WINDOW_SECONDS = 9.01  # the DNSMOS models' fixed input length (official script's INPUT_LENGTH)
NORMALISERS: dict[str, Callable[[float], float]] = {
    "pesq": lambda x: (x - 1.0) / 3.5,
    "estoi": lambda x: x,
    "si_sdr": lambda x: (min(max(x, -10.0), 30.0) + 10.0) / 40.0,
    "dnsmos": lambda x: (x - 1.0) / 4.0,
}
DEFAULT_WEIGHTS = {"pesq": 1.0, "estoi": 1.0, "si_sdr": 1.0, "dnsmos": 0.0}


# ---------------------------------------------------------------------------- metrics (pure functions)


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant SDR in dB of `estimate` against `reference` (both [L]; see the module docstring)."""
    s = np.asarray(reference, dtype=np.float64)
    e = np.asarray(estimate, dtype=np.float64)
    s = s - s.mean()
    e = e - e.mean()
    eps = np.finfo(np.float64).eps
    alpha = np.dot(e, s) / (np.dot(s, s) + eps)
    target = alpha * s  # [L]
    residual = e - target  # [L]
    return float(10.0 * np.log10((np.dot(target, target) + eps) / (np.dot(residual, residual) + eps)))


def pesq_score(reference: np.ndarray, estimate: np.ndarray, rate: int) -> float | None:
    """PESQ MOS-LQO: wide-band at 16 kHz, narrow-band at 8 kHz; None where PESQ cannot score."""
    from pesq import PesqError, pesq

    if rate not in (8000, 16000):
        raise ValueError(f"pesq_score: rate {rate} Hz; PESQ is defined at 8000 (nb) and 16000 (wb) only")
    mode = "wb" if rate == 16000 else "nb"
    try:
        value = float(pesq(rate, reference, estimate, mode))
    except (PesqError, ValueError):  # no utterances, too short, silent processed signal, ...
        return None
    return value if math.isfinite(value) and value >= 0 else None  # negative values are error codes


def estoi_score(reference: np.ndarray, estimate: np.ndarray, rate: int) -> float | None:
    """ESTOI in about [0, 1]; None when pystoi finds too few speech frames (it would return 1e-5)."""
    from pystoi import stoi

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(reference, estimate, rate, extended=True))
    if any("Not enough STFT frames" in str(w.message) for w in caught) or not math.isfinite(value):
        return None
    return value


def unscorable(audio: np.ndarray, rate: int, min_seconds: float = MIN_SECONDS) -> str | None:
    """Why a clip cannot be scored ("non-finite", "too short", "silent"), or None if it can."""
    if not np.isfinite(audio).all():
        return "non-finite"
    if len(audio) < min_seconds * rate:
        return "too short"
    if len(audio) == 0 or np.abs(audio).max() < SILENCE_PEAK:
        return "silent"
    return None


def intrusive_scores(
    estimate: np.ndarray, reference: np.ndarray, rate: int, metrics: Sequence[str], min_seconds: float = MIN_SECONDS
) -> dict[str, float | None]:
    """{metric: value or None} for one row (rate 8000 or 16000); top-level so worker processes can run it."""
    length = min(len(estimate), len(reference))
    estimate, reference = estimate[:length], reference[:length]  # [L] each
    if unscorable(estimate, rate, min_seconds) or unscorable(reference, rate, min_seconds):
        return {m: None for m in metrics}
    out: dict[str, float | None] = {}
    for metric in metrics:
        if metric == "pesq":
            out[metric] = pesq_score(reference, estimate, rate)
        elif metric == "estoi":
            out[metric] = estoi_score(reference, estimate, rate)
        else:
            out[metric] = si_sdr(estimate, reference)
    return out


# ---------------------------------------------------------------------------- DNSMOS


@functools.lru_cache(maxsize=2)
def dnsmos_model(personalized: bool = False) -> Any:
    """speechmos' DNSMOS (both ONNX sessions) over the model files its wheel ships; loaded once."""
    from speechmos import dnsmos as speechmos_dnsmos

    root = Path(speechmos_dnsmos.__file__).parent
    primary = root / ("pdnsmos_models" if personalized else "dnsmos_models") / "sig_bak_ovr.onnx"
    return speechmos_dnsmos.DNSMOS(str(primary), str(root / "dnsmos_models" / "model_v8.onnx"))


def dnsmos_windows(audio: np.ndarray, hops: int | None = 1) -> list[np.ndarray]:
    """The official script's 9.01-s windows of a 16 kHz clip (tiled by doubling), the first `hops` of them."""
    while len(audio) < int(DNSMOS_WINDOW_SECONDS * RATE):
        audio = np.append(audio, audio)
    count = int(np.floor(len(audio) / RATE) - DNSMOS_WINDOW_SECONDS) + 1
    if hops is not None:
        count = min(count, hops)
    return [audio[int(h * RATE) : int((h + DNSMOS_WINDOW_SECONDS) * RATE)] for h in range(count)]


def dnsmos_scores(audio: np.ndarray, hops: int | None = 1, personalized: bool = False, p808: bool = False) -> dict:
    """{"sig", "bak", "ovrl"(, "p808")} of a 16 kHz clip in [-1, 1]: the mean over its windows."""
    model = dnsmos_model(personalized)
    rows = []
    for window in dnsmos_windows(np.asarray(audio, dtype=np.float32), hops):
        raw = model.onnx_sess.run(None, {"input_1": window[None].astype(np.float32)})[0][0]  # [3] sig, bak, ovr
        row = [float(v) for v in model.get_polyfit_val(*raw, personalized)]
        if p808:
            mel = model.audio_melspec(audio=window[:-160])[None].astype(np.float32)  # [1, frames, 120]
            row.append(float(model.p808_onnx_sess.run(None, {"input_1": mel})[0][0][0]))
        rows.append(row)
    means = np.mean(np.array(rows), axis=0)
    return dict(zip(("sig", "bak", "ovrl", "p808"), (float(v) for v in means)))


# ---------------------------------------------------------------------------- reading rows


def mono(value: Any, reward: str, index: int, what: str = "sample") -> np.ndarray:
    """A float64 [L] array from a tensor / array / list of shape [L], [1, L] or [L, 1]; else one ValueError line."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    audio = np.asarray(value, dtype=np.float64)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise ValueError(
            f"{reward}: {what} {index} has shape {list(audio.shape)}; give mono audio of shape [L] "
            "(mix channels down first, e.g. x.mean(0))"
        )
    return audio


def resample(audio: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """`audio` [L] at `rate` -> [L'] at `new_rate` (torchaudio's windowed-sinc resampler)."""
    if rate == new_rate:
        return audio
    import torch
    import torchaudio.functional

    waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))  # [L]
    return torchaudio.functional.resample(waveform, int(rate), int(new_rate)).numpy().astype(np.float64)


def read_reference(value: Any, rate: int, reward: str, index: int) -> np.ndarray:
    """The clean reference of row `index` at `rate`: an array (already at `rate`) or a WAV/FLAC path."""
    if isinstance(value, (str, Path)):
        import soundfile

        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{reward}: clean reference of row {index} '{path}' does not exist")
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [L, C]
        if data.shape[1] != 1:
            raise ValueError(
                f"{reward}: clean reference of row {index} '{path}' has {data.shape[1]} channels (shape "
                f"{list(data.shape)}); give a mono file"
            )
        return resample(data[:, 0].astype(np.float64), file_rate, rate)
    return mono(value, reward, index, "clean reference of row")


def _field(prompts: Sequence[Any], fields: dict[str, Any], name: str, index: int) -> Any:
    """prompts[index][name] for a dict prompt, else fields[name][index] (the trainer's prompt fields)."""
    prompt = prompts[index] if prompts is not None and index < len(prompts) else None
    if isinstance(prompt, dict) and prompt.get(name) is not None:
        return prompt[name]
    values = fields.get(name)
    return values[index] if isinstance(values, (list, tuple)) and index < len(values) else None


def _row_rate(prompts: Sequence[Any], fields: dict[str, Any], index: int, fixed: int | None, reward: str) -> int:
    rate = fixed if fixed is not None else _field(prompts, fields, "sample_rate", index)
    rate = RATE if rate is None else rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer)) or rate <= 0 or rate != int(rate):
        raise ValueError(f"{reward}: row {index} has sample_rate {rate!r}; give a positive integer rate in Hz")
    return int(rate)


def _default_workers(workers: int | None) -> int:
    return min(4, os.cpu_count() or 1) if workers is None else max(0, int(workers))


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _process_map(fn: Callable, jobs: list[tuple], workers: int) -> list:
    """[fn(*job) for job in jobs], over a reused pool of `workers` processes (0 or 1: in this process)."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    pool = _POOLS.get(workers)
    if pool is None:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        pool = _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=context)
    try:
        return list(pool.map(fn, *zip(*jobs)))
    except BrokenProcessPool:
        _POOLS.pop(workers, None)
        warnings.warn("speech rewards: the worker pool broke; scoring this batch in this process", stacklevel=3)
        return [fn(*job) for job in jobs]


# ---------------------------------------------------------------------------- rewards


class _SpeechReward:
    """Shared reading of rows: samples, references, rates; subclasses say which metrics they run."""

    __name__ = "speech"

    def __init__(self, workers: int | None = 0, min_seconds: float = MIN_SECONDS, sample_rate: int | None = None):
        if min_seconds < 0:
            raise ValueError(f"{self.__name__}: min_seconds must be >= 0, got {min_seconds}")
        self.workers = _default_workers(workers)
        self.min_seconds = float(min_seconds)
        self.sample_rate = None if sample_rate is None else int(sample_rate)
        self._warned_no_clean = False

    def _check(self, samples: Sequence[Any], prompts: Sequence[Any] | None) -> None:
        if prompts is not None and len(prompts) != len(samples):
            raise ValueError(f"{self.__name__}: got {len(samples)} samples for {len(prompts)} prompts; one per sample")

    def intrusive(
        self, samples: Sequence[Any], prompts: Sequence[Any] | None, fields: dict[str, Any], metrics: Sequence[str]
    ) -> list[dict[str, float | None]]:
        """Per row {metric: value | None} for intrusive `metrics`, scored over the process pool."""
        self._check(samples, prompts)
        jobs, owners = [], []
        for i, sample in enumerate(samples):
            estimate = mono(sample, self.__name__, i)
            rate = _row_rate(prompts, fields, i, self.sample_rate, self.__name__)
            clean = _field(prompts, fields, "clean", i)
            if clean is None:
                self._warn_no_clean(i)
                continue
            reference = read_reference(clean, rate, self.__name__, i)
            if rate not in (8000, 16000):  # PESQ's rates; ESTOI and SI-SDR do not mind
                estimate, reference, rate = resample(estimate, rate, RATE), resample(reference, rate, RATE), RATE
            jobs.append((estimate, reference, rate, tuple(metrics), self.min_seconds))
            owners.append(i)
        rows: list[dict[str, float | None]] = [{m: None for m in metrics} for _ in samples]
        for i, scores in zip(owners, _process_map(intrusive_scores, jobs, self.workers)):
            rows[i] = scores
        return rows

    def _warn_no_clean(self, index: int) -> None:
        if not self._warned_no_clean:
            self._warned_no_clean = True
            warnings.warn(
                f"{self.__name__}: prompt {index} has no 'clean' reference; intrusive metrics leave such rows "
                "unscored (use dnsmos for real noisy recordings)",
                stacklevel=3,
            )


class _SingleMetric(_SpeechReward):
    metric = ""

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any] | None = None, **fields: Any) -> list:
        return [row[self.metric] for row in self.intrusive(samples, prompts, fields, (self.metric,))]


class PESQ(_SingleMetric):
    """reward(samples, prompts, clean=..., sample_rate=...) -> PESQ per row (wb at 16 kHz, nb at 8 kHz) or None.

    workers: processes scoring rows in parallel (0: this process; None: min(4, cores)). min_seconds: shorter
    clips are unscored.
    sample_rate: the samples' rate for every row (None: each row's `sample_rate` field, else 16000).
    """

    __name__ = "pesq"
    metric = "pesq"


class ESTOI(_SingleMetric):
    """reward(samples, prompts, clean=..., sample_rate=...) -> ESTOI per row (pystoi, extended=True) or None.

    Options as PESQ.
    """

    __name__ = "estoi"
    metric = "estoi"


class SISDR(_SingleMetric):
    """reward(samples, prompts, clean=..., sample_rate=...) -> SI-SDR in dB per row or None. Options as PESQ."""

    __name__ = "si_sdr"
    metric = "si_sdr"


class DNSMOS(_SpeechReward):
    """Non-intrusive DNSMOS P.835: {"score": OVRL, "sig", "bak", "ovrl"(, "p808")} per row, None where unscored.

    hops: 9.01-s windows averaged per clip (None: all, as the official script; see the module docstring).
    personalized: the personalised-DNSMOS model (penalises interfering talkers). p808: also P.808 MOS.
    workers: threads (None: min(4, cores); 0: this thread). min_seconds, sample_rate: as PESQ.
    """

    __name__ = "dnsmos"

    def __init__(
        self,
        hops: int | None = 1,
        personalized: bool = False,
        p808: bool = False,
        workers: int | None = None,
        min_seconds: float = MIN_SECONDS,
        sample_rate: int | None = None,
    ):
        super().__init__(workers, min_seconds, sample_rate)
        if hops is not None and hops < 1:
            raise ValueError(f"dnsmos: hops must be >= 1 or None (all windows), got {hops}")
        self.hops, self.personalized, self.p808 = hops, bool(personalized), bool(p808)

    def rows(self, samples: Sequence[Any], prompts: Sequence[Any] | None, fields: dict[str, Any]) -> list[dict | None]:
        """Per row {"sig", "bak", "ovrl"(, "p808")} or None (unscorable), in order."""
        self._check(samples, prompts)
        clips: list[np.ndarray | None] = []
        for i, sample in enumerate(samples):
            audio = mono(sample, self.__name__, i)
            rate = _row_rate(prompts, fields, i, self.sample_rate, self.__name__)
            clips.append(None if unscorable(audio, rate, self.min_seconds) else resample(audio, rate, RATE))

        def score(clip: np.ndarray | None) -> dict | None:
            if clip is None:
                return None
            return dnsmos_scores(np.clip(clip, -1.0, 1.0), self.hops, self.personalized, self.p808)

        if any(c is not None for c in clips):
            dnsmos_model(self.personalized)  # load once, before any thread needs it
        if self.workers <= 1 or len(clips) <= 1:
            return [score(c) for c in clips]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(score, clips))

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any] | None = None, **fields: Any) -> dict:
        rows = self.rows(samples, prompts, fields)
        keys = ("sig", "bak", "ovrl") + (("p808",) if self.p808 else ())
        out = {key: [None if r is None else r[key] for r in rows] for key in keys}
        return {"score": out["ovrl"], **out}


class SpeechQuality(_SpeechReward):
    """Weighted mix of normalised PESQ, ESTOI, SI-SDR (and DNSMOS OVRL); every metric as a sub-score.

    weights: {metric: weight} over pesq, estoi, si_sdr, dnsmos (missing keys keep the defaults
    1, 1, 1, 0); see the module docstring for the normalisation. with_dnsmos: compute and report
    DNSMOS even at weight 0. dnsmos_hops, dnsmos_workers: DNSMOS's `hops` and `workers` (threads).
    workers, min_seconds, sample_rate: as PESQ.
    """

    __name__ = "speech_quality"

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        with_dnsmos: bool = False,
        dnsmos_hops: int | None = 1,
        workers: int | None = 0,
        dnsmos_workers: int | None = None,
        min_seconds: float = MIN_SECONDS,
        sample_rate: int | None = None,
    ):
        super().__init__(workers, min_seconds, sample_rate)
        unknown = sorted(set(weights or {}) - set(DEFAULT_WEIGHTS))
        if unknown:
            raise ValueError(
                f"speech_quality: unknown metric '{unknown[0]}' in weights; choose from {', '.join(DEFAULT_WEIGHTS)}"
            )
        self.weights = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in (weights or {}).items()}}
        bad = {k: v for k, v in self.weights.items() if not math.isfinite(v) or v < 0}
        if bad or not any(self.weights.values()):
            raise ValueError(f"speech_quality: weights must be finite, >= 0 and not all 0, got {self.weights}")
        self.dnsmos = None
        if with_dnsmos or self.weights["dnsmos"] > 0:
            self.dnsmos = DNSMOS(dnsmos_hops, workers=dnsmos_workers, min_seconds=min_seconds, sample_rate=sample_rate)

    def __call__(self, samples: Sequence[Any], prompts: Sequence[Any] | None = None, **fields: Any) -> dict:
        rows = self.intrusive(samples, prompts, fields, INTRUSIVE)
        out: dict[str, list] = {m: [r[m] for r in rows] for m in INTRUSIVE}
        if self.dnsmos is not None:
            mos = self.dnsmos.rows(samples, prompts, fields)
            for key in ("sig", "bak", "ovrl"):
                out[f"dnsmos_{key}"] = [None if r is None else r[key] for r in mos]
        raw = {**{m: out[m] for m in INTRUSIVE}, "dnsmos": out.get("dnsmos_ovrl", [None] * len(samples))}
        used = [m for m, w in self.weights.items() if w > 0]
        total = sum(self.weights[m] for m in used)
        scores: list[float | None] = []
        for i in range(len(samples)):
            values = [raw[m][i] for m in used]
            if any(v is None for v in values):
                scores.append(None)
            else:
                scores.append(sum(self.weights[m] * NORMALISERS[m](v) for m, v in zip(used, values)) / total)
        return {"score": scores, **out}
