"""The speech data of the embedded audio default: the committed espeak-ng corpus, the noises, SNR mixing
and the `speech` prompt set (mmgrpo/miniworld/speech.py, mmgrpo/pretrain/speech_corpus.py)."""

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("soundfile")

from mmgrpo.miniworld import speech as sp  # noqa: E402
from mmgrpo.pretrain import speech_corpus as build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 16384


@pytest.fixture(scope="module")
def small_sets():
    return sp.speech_prompts(num_train=24, num_eval=12)


def test_corpus_loads_from_the_installed_assets():
    train, held_out = sp.load_corpus("train"), sp.load_corpus("eval")
    assert (len(train), len(held_out)) == (240, 48)
    for record in train + held_out:
        audio = record["audio"]
        assert audio.dtype == np.float32 and audio.shape == (LENGTH,)
        assert np.isfinite(audio).all()
        assert abs(np.abs(audio).max() - 0.9) < 1e-3  # peak-normalised (16-bit FLAC rounding)
        speech = audio[record["onset"] : record["offset"]]
        assert np.sqrt(np.mean(speech**2)) > 0.03  # not silent where the manifest says speech is
        assert np.abs(audio[: record["onset"]]).max(initial=0) < 0.05  # silence before the onset
    assert len({r["text"] for r in train}) == 240  # distinct texts


def test_held_out_utterances_share_no_text_word_or_voice_with_training():
    train, held_out = sp.load_corpus("train"), sp.load_corpus("eval")
    words = lambda records: {w for r in records for w in r["text"].split()}  # noqa: E731
    assert not words(train) & words(held_out)
    assert not {r["voice"] for r in train} & {r["voice"] for r in held_out}
    assert not {r["file"] for r in train} & {r["file"] for r in held_out}


def test_corpus_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mmgrpo.assets"]
    folder = ROOT / "assets" / "speech_corpus"
    files = [p.relative_to(ROOT / "assets").as_posix() for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 240 + 48 + 3  # FLAC files, manifest.jsonl, build.json, DATA_CARD.md
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not unshipped


@pytest.mark.parametrize("kind", sp.NOISES)
@pytest.mark.parametrize("snr", [-5.0, 0.0, 7.3, 15.0])
def test_mixing_hits_the_requested_snr_without_clipping(kind, snr):
    clean = sp.load_corpus("train")[3]["audio"]
    talkers = [r["audio"] for r in sp.load_corpus("train")[4:10]]
    noise = sp.make_noise(kind, LENGTH, seed=11, talkers=talkers)
    noisy, scaled_clean = sp.mix_at_snr(clean, noise, snr)
    assert noisy.dtype == np.float32 and noisy.shape == (LENGTH,)
    assert abs(sp.snr_db(scaled_clean, noisy) - snr) < 0.01
    assert np.abs(noisy).max() <= sp.MAX_PEAK + 1e-6
    ratio = scaled_clean / np.where(clean == 0, 1, clean)
    assert np.allclose(ratio[clean != 0], ratio[clean != 0][0], rtol=1e-5)  # clean only rescaled, never changed


def test_a_loud_mix_is_scaled_down_not_clipped():
    clean = sp.load_corpus("train")[0]["audio"]
    noisy, scaled_clean = sp.mix_at_snr(clean, sp.make_noise("clicks", LENGTH, seed=0), -5.0)
    assert np.isclose(np.abs(noisy).max(), sp.MAX_PEAK)
    assert np.abs(scaled_clean).max() < np.abs(clean).max()  # both scaled together
    assert abs(sp.snr_db(scaled_clean, noisy) + 5.0) < 0.01


def _slope(noise):
    """Log-log slope of the power spectrum between 100 Hz and 4 kHz."""
    power = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(noise.size, 1 / 16000)
    band = (freqs > 100) & (freqs < 4000)
    return np.polyfit(np.log(freqs[band]), np.log(power[band]), 1)[0]


def test_noises_are_what_their_names_say():
    white, pink, brown = (sp.make_noise(k, LENGTH, seed=3) for k in ("white", "pink", "brown"))
    assert abs(_slope(white)) < 0.2 and abs(_slope(pink) + 1) < 0.2 and abs(_slope(brown) + 2) < 0.2
    hum = sp.make_noise("hum", LENGTH, seed=3)
    spectrum = np.abs(np.fft.rfft(hum))
    peak_hz = np.argmax(spectrum) * 16000 / LENGTH
    assert min(abs(peak_hz - 50), abs(peak_hz - 60)) < 2  # the mains fundamental dominates
    clicks = sp.make_noise("clicks", LENGTH, seed=3)
    assert np.mean(np.abs(clicks) < 0.05) > 0.5  # mostly quiet between impulses
    for kind in sp.NOISES:
        noise = sp.make_noise(kind, LENGTH, seed=5, talkers=[r["audio"] for r in sp.load_corpus("train")[:8]])
        assert noise.dtype == np.float32 and np.isfinite(noise).all()
        assert abs(np.sqrt(np.mean(noise.astype(np.float64) ** 2)) - 1) < 1e-4  # unit RMS
        assert not np.array_equal(noise, sp.make_noise(kind, LENGTH, seed=6, talkers=[r["audio"] for r in sp.load_corpus("train")[:8]]))


def test_prompt_items_have_the_audio_fields(small_sets):
    for split in ("train", "eval"):
        for item in small_sets[split]:
            assert isinstance(item["prompt"], str) and item["noise"] in item["prompt"]
            assert f"{item['snr_db']:g} dB" in item["prompt"]
            assert item["sample_rate"] == 16000
            for key in ("noisy", "clean"):
                assert item[key].dtype == np.float32 and item[key].shape == (LENGTH,)
                assert np.abs(item[key]).max() <= sp.MAX_PEAK + 1e-6  # no clipping
            assert -5 <= item["snr_db"] <= 15
            assert abs(sp.snr_db(item["clean"], item["noisy"]) - item["snr_db"]) < 0.01
    assert small_sets["eval"][0]["prompt"].startswith("held-out utterance ")


def test_every_noise_kind_is_present_in_both_splits(small_sets):
    for split in ("train", "eval"):
        assert {item["noise"] for item in small_sets[split]} == set(sp.NOISES)


def test_same_seed_same_arrays_other_seed_other_mixes(small_sets):
    again = sp.speech_prompts(num_train=24, num_eval=12)
    other = sp.speech_prompts(num_train=24, num_eval=12, seed=1)
    for split in ("train", "eval"):
        for a, b, c in zip(small_sets[split], again[split], other[split], strict=True):
            assert a["prompt"] == b["prompt"] and a["noise_seed"] == b["noise_seed"]
            np.testing.assert_array_equal(a["noisy"], b["noisy"])
            np.testing.assert_array_equal(a["clean"], b["clean"])
        assert [a["snr_db"] for a in small_sets[split]] != [c["snr_db"] for c in other[split]]


def test_train_and_held_out_share_no_utterance_text_or_noise_seed():
    sets = sp.speech_prompts(num_train=240, num_eval=48, seed=2)
    train, held_out = sets["train"], sets["eval"]
    assert {i["utterance"] for i in train} == {r["file"] for r in sp.load_corpus("train")}  # all used
    assert all(i["utterance"].startswith("eval/") for i in held_out)
    assert not {i["text"] for i in train} & {i["text"] for i in held_out}
    assert not {i["noise_seed"] for i in train} & {i["noise_seed"] for i in held_out}
    seeds_of_other_runs = {i["noise_seed"] for s in (0, 1) for i in sp.speech_prompts(num_train=48, num_eval=0, seed=s)["train"]}
    assert not seeds_of_other_runs & {i["noise_seed"] for i in held_out}


def test_held_out_babble_is_made_of_held_out_talkers_only():
    item = next(i for i in sp.speech_prompts(num_train=0, num_eval=12)["eval"] if i["noise"] == "babble")
    corpus = sp.load_corpus("eval")
    talkers = [r["audio"] for r in corpus if r["file"] != item["utterance"]]
    expected = sp.make_noise("babble", LENGTH, item["noise_seed"], talkers=talkers).astype(np.float64)
    residual = item["noisy"].astype(np.float64) - item["clean"]
    assert np.corrcoef(residual, expected)[0, 1] > 0.999  # the item's noise is exactly this babble


def test_bad_arguments_are_one_clear_line():
    with pytest.raises(ValueError, match="unknown noise.*'rain'"):
        sp.speech_prompts(num_train=1, num_eval=1, noises=["white", "rain"])
    with pytest.raises(ValueError, match="snr_range"):
        sp.speech_prompts(num_train=1, num_eval=1, snr_range=[15, -5])
    with pytest.raises(ValueError, match="babble needs at least 2 talkers"):
        sp.make_noise("babble", LENGTH, seed=0)
    with pytest.raises(ValueError, match="silent"):
        sp.mix_at_snr(np.zeros(LENGTH, np.float32), sp.make_noise("white", LENGTH, seed=0), 0.0)


def test_yaml_style_arguments_and_the_registry_name():
    from mmgrpo.registry import DATASETS, resolve

    assert resolve("speech", DATASETS, "prompt set") is sp.speech_prompts
    sets = sp.speech_prompts(num_train=2, num_eval=1, snr_range=[0, 5], noises=["hum"])  # lists, as YAML gives
    assert all(i["noise"] == "hum" and 0 <= i["snr_db"] <= 5 for i in sets["train"] + sets["eval"])


def _tone(text, voice, speed, pitch):
    """A stand-in synthesiser: a tone burst whose length follows the text and speed (22.05 kHz)."""
    rate = 22050
    n = int(rate * 0.4 * len(text.split()) * 160 / speed)
    t = np.arange(n) / rate
    audio = np.concatenate([np.zeros(500), 0.3 * np.sin(2 * np.pi * (100 + pitch) * t), np.zeros(700)])
    return audio.astype(np.float32), rate


def test_shortened_rebuild_makes_a_loadable_corpus(tmp_path):
    record = build.build_corpus(tmp_path, num_train=5, num_eval=3, seed=4, synthesise=_tone)
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [line["split"] for line in lines] == ["train"] * 5 + ["eval"] * 3
    assert (tmp_path / "DATA_CARD.md").is_file() and record["num_train"] == 5
    held_out = sp.load_corpus("eval", corpus=tmp_path)
    assert len(held_out) == 3 and all(r["audio"].shape == (LENGTH,) for r in held_out)
    assert all(abs(np.abs(r["audio"]).max() - build.PEAK) < 1e-3 for r in held_out)
    items = sp.speech_prompts(num_train=4, num_eval=2, corpus=str(tmp_path))
    assert items["eval"][0]["utterance"].startswith("eval/")
    again = build.build_corpus(tmp_path / "again", num_train=5, num_eval=3, seed=4, synthesise=_tone)
    assert again["size_bytes"] == record["size_bytes"]
    assert (tmp_path / "manifest.jsonl").read_text() == (tmp_path / "again" / "manifest.jsonl").read_text()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is needed only to rebuild the corpus")
def test_shortened_espeak_rebuild(tmp_path):
    record = build.main(["--out", str(tmp_path), "--num-train", "2", "--num-eval", "1"])
    assert record["command"] == "python -m mmgrpo.pretrain.speech_corpus --num-train 2 --num-eval 1"
    corpus = sp.load_corpus("train", corpus=tmp_path)
    assert len(corpus) == 2 and all(np.sqrt(np.mean(r["audio"] ** 2)) > 0.01 for r in corpus)


def test_the_build_says_how_to_install_espeak(monkeypatch, tmp_path):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="apt-get install -y espeak-ng"):
        build.main(["--out", str(tmp_path), "--quick"])
