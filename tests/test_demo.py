"""The demo without a browser: loading a run's two policies, one seeded comparison, the views, the
checks before the server starts (one line, exit 2) and bad input in the page (a message, no crash)."""

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch

from mmgrpo.cli import main
from mmgrpo.config import ConfigError, load_config
from mmgrpo.demo import inputs, runs_tab, views
from mmgrpo.demo.policies import compare, load_run
from mmgrpo.demo.server import check_share
from mmgrpo.pipelines.toy import ToyAdapter
from mmgrpo.trainer import train

TINY = ["eval.num_prompts=4", "train.checkpoint_every=2", "train.prompts_per_step=8", "train.group_size=4"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "toy"
    train("toy", out=out, overrides=TINY, max_steps=4, progress=False)
    return out


@pytest.fixture(scope="module")
def toy_ema_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "toy-ema"
    train("toy", out=out, overrides=[*TINY, "optim.ema_decay=0.5"], max_steps=4, progress=False)
    return out


def _weights(folder, name):
    from safetensors.torch import load_file

    return load_file(str(folder / name))


# ------------------------------------------------------------------------------- loading


def test_trained_policy_holds_the_checkpoint_and_base_the_initial_weights(toy_run):
    run = load_run(toy_run)
    assert run.step == 4 and not run.uses_ema and run.checkpoint.name == "step_000004"
    saved = _weights(run.checkpoint, "trainable.safetensors")
    params = run.adapter.trainable_parameters()
    assert set(params) == set(saved)
    assert all(torch.equal(params[k].detach(), saved[k]) for k in saved)
    initial = ToyAdapter(**run.cfg.pipeline.kwargs).policy.state_dict()
    with run.adapter.reference():
        base = run.adapter.tuning.active.state_dict()
    assert all(torch.equal(base[k], initial[k]) for k in initial)
    assert any(not torch.equal(params[k].detach(), initial[k]) for k in saved)  # training moved the weights


def test_a_run_with_an_ema_is_compared_with_its_ema_weights(toy_ema_run):
    run = load_run(toy_ema_run)
    assert run.uses_ema
    ema, raw = _weights(run.checkpoint, "ema.safetensors"), _weights(run.checkpoint, "trainable.safetensors")
    params = run.adapter.trainable_parameters()
    assert all(torch.equal(params[k].detach(), ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_an_older_checkpoint_can_be_named(toy_run):
    run = load_run(toy_run, "step_000002")
    assert run.step == 2
    with pytest.raises(ConfigError, match="no checkpoint 'step_9'.*step_000004, step_000002"):
        load_run(toy_run, "step_9")
    with pytest.raises(ConfigError, match="--threads must be at least 1"):
        load_run(toy_run, threads=0)


def test_timing_tool_measures_a_comparison(toy_run):
    from mmgrpo.demo.timing import time_run

    measured = time_run(str(toy_run), threads=1, repeats=2)
    assert 0 < measured["median"] <= measured["max"] and measured["load"] > 0


# ------------------------------------------------------------------------------- one comparison


def test_both_sides_sample_with_the_same_seed_as_the_adapter_would(toy_run):
    run = load_run(toy_run)
    prompt = run.held_out[0]
    result = compare(run, prompt, seed=7, count=3)
    assert result.base.samples == compare(run, prompt, seed=7, count=3).base.samples  # reproducible

    def by_hand(reference):
        generator = torch.Generator().manual_seed(7)
        if reference:
            with run.adapter.reference():
                return run.adapter.sample([prompt] * 3, 1, generator, evaluate=True).samples
        return run.adapter.sample([prompt] * 3, 1, generator, evaluate=True).samples

    assert result.base.samples == by_hand(True)
    assert result.trained.samples == by_hand(False)
    for side in (result.base, result.trained):  # the run's rewards, per sample
        expected = run.reward_fns["sequence_match"](side.samples, side.prompts, target=[prompt["target"]] * 3)
        assert side.scores["sequence_match"] == pytest.approx(expected)
        assert side.total == pytest.approx(expected)  # exact_match has weight 0 in the toy config
        assert side.score_error is None and side.seconds > 0


def test_a_bf16_run_is_sampled_in_bf16_as_its_evaluation_was(toy_run):
    from mmgrpo.demo.policies import sampling_precision

    cfg = load_config(toy_run / "config.yaml")
    assert not isinstance(sampling_precision(cfg, torch.device("cpu")), torch.autocast)
    cfg.train.mixed_precision = "bf16"
    precision = sampling_precision(cfg, torch.device("cpu"))
    assert isinstance(precision, torch.autocast) and precision.fast_dtype == torch.bfloat16


def test_a_prompt_the_rewards_cannot_score_is_a_message_not_a_crash(toy_run):
    run = load_run(toy_run)
    result = compare(run, "abc", seed=0)  # a typed toy prompt has no target for sequence_match
    assert result.trained.samples and result.trained.score_error and "sequence_match" in result.trained.score_error


# ------------------------------------------------------------------------------- before the server


def _demo_error(capsys, *args):
    code = main(["demo", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("mmgrpo: error: ")
    return err


def test_bad_run_directories_stop_in_one_line_before_any_server(tmp_path, toy_run, capsys):
    modules_before = "gradio" in sys.modules
    assert "not a folder" in _demo_error(capsys, tmp_path / "nowhere")
    assert "not a run directory" in _demo_error(capsys, tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(toy_run / name, bare / name)
    assert "has no checkpoint yet" in _demo_error(capsys, bare)
    damaged = tmp_path / "damaged"
    shutil.copytree(toy_run, damaged)
    weights = damaged / "checkpoints" / "step_000004" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    err = _demo_error(capsys, damaged)
    assert "step_000004 is damaged" in err and "trainable.safetensors" in err and "--checkpoint step_000002" in err
    assert ("gradio" in sys.modules) == modules_before  # no page was built


def test_a_modality_whose_extra_is_missing_stops_in_one_line(tmp_path, toy_run, capsys):
    adapter_file = tmp_path / "needs_extra.py"
    adapter_file.write_text(  # an adapter that imports its extra's package when built, as the shipped ones do
        "class Needy:\n    def __init__(self, **kwargs):\n        import mmgrpo_not_installed_xyz\n"
    )
    run = tmp_path / "needy"
    shutil.copytree(toy_run, run)
    config = (run / "config.yaml").read_text().replace("name: toy\n", f"name: {adapter_file}:Needy\n", 1)
    (run / "config.yaml").write_text(config)
    err = _demo_error(capsys, run)
    assert "needs the package 'mmgrpo_not_installed_xyz'" in err and "pip install" in err


def test_share_without_internet_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="--share needs Gradio's share server.*cannot reach"):
        check_share(True, reachable=False)
    check_share(False, reachable=False)
    check_share(True, reachable=True)


# ------------------------------------------------------------------------------- bad input in the page


def test_page_handler_shows_bad_input_as_a_message(toy_run, tmp_path):
    from mmgrpo.demo.app import build_app

    page = build_app(load_run(toy_run), tmp_path).mm_page
    for text, needle in (("   ", "the prompt is empty"), ("xyz!", "must use only 'abcdef'")):
        updates = page.on_compare(0, text, None, 0, 1)
        assert list(updates) == [page.message] and needle in updates[page.message]
    updates = page.on_compare(0, "", None, 1.5, 1)
    assert "seed must be a whole number" in updates[page.message]
    updates = page.on_compare(0, "", None, 3, 2)  # and it still compares afterwards
    assert "mm-scores" in updates[page.scores] and "seed 3, 2 sample(s)" in updates[page.timing]


def test_masked_diffusion_samples_are_shown_coloured_in_the_page(toy_run, tmp_path):
    from mmgrpo.demo.app import ComparePage

    page = ComparePage(load_run(toy_run), "mdlm", tmp_path)
    sample = {"text": "4+1=5", "tokens": ["4", "+", "1", "=", "5"], "steps": [0, 0, 1, 2, 3]}  # the mdlm adapter's
    out = page.text_view([sample, {**sample, "steps": [3, 3, 3, 3, 3]}], "trained")
    assert out.startswith('<div id="mm-trained-text">') and out.count('class="mm-token"') == 10
    assert "<b>trained 1</b>" in out and "<b>trained 2</b>" in out
    plain = ComparePage(load_run(toy_run), "text", tmp_path).text_view(["ab<c"], "base")
    assert "ab&lt;c" in plain and "mm-token" not in plain


def _wav(path, wave, rate):
    import soundfile as sf

    sf.write(str(path), wave, rate, subtype="PCM_16")
    return path


def test_audio_uploads(tmp_path):
    t = np.arange(44100) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wave, note = inputs.read_audio_upload(_wav(tmp_path / "a.wav", tone, 44100), 16000)
    assert wave.dtype == np.float32 and wave.shape == (16000,) and "44100 Hz" in note and "16000" in note
    same, note = inputs.read_audio_upload(_wav(tmp_path / "b.wav", tone[:16000], 16000), 16000)
    assert note is None and same.shape == (16000,)
    long_clip = _wav(tmp_path / "long.wav", np.tile(tone[:16000], 3), 16000)
    prompt, note = inputs.build_prompt("audio", None, None, str(long_clip), sample_rate=16000, max_samples=18304)
    assert prompt["noisy"].shape == (18304,) and "first 1.14 s of your 3.0 s" in note
    with pytest.raises(inputs.InputError, match="2 channels.*mono"):
        inputs.read_audio_upload(_wav(tmp_path / "c.wav", np.stack([tone, tone], 1), 44100), 16000)
    (tmp_path / "d.wav").write_bytes(b"RIFF" + bytes(range(200)))
    with pytest.raises(inputs.InputError, match="not a readable audio file"):
        inputs.read_audio_upload(tmp_path / "d.wav", 16000)
    with pytest.raises(inputs.InputError, match="uploads are limited to"):
        inputs.check_size(tmp_path / "b.wav", limit=1000)


def test_image_uploads_and_prompts(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    prompt, _ = inputs.build_prompt("vlm", None, "Where is it?", str(tmp_path / "ok.png"))
    assert prompt["image"].shape == (20, 30, 3) and prompt["image_size"] == [30, 20] and "box" not in prompt
    with pytest.raises(inputs.InputError, match="not a readable image"):
        inputs.build_prompt("vlm", None, "Where is it?", str(tmp_path / "bad.png"))
    picked = {"prompt": "Where is the red circle?", "box": [1, 2, 3, 4], "image": np.zeros((4, 4, 3), np.uint8)}
    assert inputs.build_prompt("vlm", picked, "", None)[0] is picked
    other, _ = inputs.build_prompt("vlm", picked, "Where is the blue square?", None)
    assert "box" not in other  # the truth answered the other question: not scored against it
    assert inputs.build_prompt("image", picked, "  a red circle ", None)[0] == "a red circle"
    with pytest.raises(inputs.InputError, match="empty"):
        inputs.build_prompt("image", None, "", None)
    for bad in ("x", -1, 2.5, float("nan")):
        with pytest.raises(inputs.InputError):
            inputs.parse_seed(bad)
    assert inputs.parse_seed(12.0) == 12


# ------------------------------------------------------------------------------- views


def test_mdlm_tokens_are_coloured_by_their_unmasking_step():
    out = views.mdlm_html(["The", " <cat>", " sat"], [2, 0, 1], num_steps=3)
    assert out.count('class="mm-token"') == 3 and "&lt;cat&gt;" in out and "<cat>" not in out
    assert 'data-step="0"' in out and views.step_colour(0, 3) in out and views.step_colour(2, 3) in out
    assert views.step_colour(0, 3) == "#1e3ca0" and views.step_colour(2, 3) == "#ffec96"  # the two ends
    middle = views.step_colour(1, 3)
    assert int(middle[1:3], 16) == round((30 + 255) / 2)  # halfway between them
    with pytest.raises(ValueError, match="3 tokens but 2"):
        views.mdlm_html(["a", "b", "c"], [0, 1])
    assert views.mdlm_parts({"tokens": ["a"], "steps": [0]}) == (["a"], [0]) and views.mdlm_parts("text") is None


def test_scores_table_highlights_the_difference():
    out = views.scores_html({"r": [0.2, 0.4], "r/sub": [None]}, {"r": [0.5, 0.7], "r/sub": [None]}, [0.3], [0.1])
    assert '<td class="up">+0.3</td>' in out  # mean 0.3 -> 0.6
    assert '<td class="down">-0.2</td>' in out  # total 0.3 -> 0.1
    assert '<td class="na"></td>' in out and "not scored" in out and 'class="sub"' in out
    assert views.difference_class(1.0, 1.0) == "same" and views.difference_class(None, 1.0) == "na"


def test_boxes_are_drawn_where_the_answer_puts_them():
    image = np.zeros((56, 56, 3), np.uint8)
    prompt = {"image": image, "image_size": [112, 112], "resized_size": [56, 56], "box": [0, 0, 20, 20]}
    boxes = views.answer_boxes("<answer>[10, 10, 20, 30]</answer>", prompt)
    assert boxes == [[20.0, 20.0, 40.0, 60.0]]  # absolute coordinates of the resized image, times 2
    assert views.truth_boxes(prompt) == [[0.0, 0.0, 20.0, 20.0]]
    picture = np.asarray(views.draw_boxes(image, {"trained": [[10, 10, 20, 30]]}))
    factor = picture.shape[0] // 56
    assert tuple(picture[10 * factor, 15 * factor]) == views.SIDE_COLOURS["trained"]  # on the top edge
    assert tuple(picture[20 * factor, 15 * factor]) == (0, 0, 0)  # inside: untouched
    same = [[10, 10, 20, 30]]
    picture = np.asarray(views.draw_boxes(image, {"base": same, "trained": same, "truth": same}))
    width = max(2, round(factor / 3))
    edge = [tuple(picture[10 * factor + d, 15 * factor]) for d in (0, width, 2 * width)]
    assert edge == [views.SIDE_COLOURS[k] for k in ("trained", "truth", "base")]  # all three visible


def test_view_kinds():
    assert views.view_kind("toy") == "text" and views.view_kind("vlm") == "vlm"
    assert views.view_kind("custom", torch.zeros(3, 8, 8)) == "image"
    assert views.view_kind("custom", torch.zeros(100)) == "audio" and views.view_kind("custom", "x") == "text"


# ------------------------------------------------------------------------------- the Run tab


def test_eval_table_has_the_paired_interval(toy_run):
    from mmgrpo.scoring import paired_gain

    ev = json.loads((toy_run / "eval.json").read_text())
    rows = {row[0]: row for row in runs_tab.eval_table(ev)}
    row = rows["reward/sequence_match/mean"]
    gain = paired_gain(ev["before"]["per_sample"]["sequence_match"], ev["after"]["per_sample"]["sequence_match"])
    assert row[4] == f"{gain['ci95'][0]:+.4f} to {gain['ci95'][1]:+.4f} (n={gain['n']})"
    assert math.isclose(row[3], round(row[2] - row[1], 5), abs_tol=1e-5)


def test_gallery_pages_and_curves(tmp_path, toy_run):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "secret.png").write_bytes(b"x")
    entries = [{"prompt": f"p{i}", "sample": f"s{i}", "rewards": {"r": i / 10}} for i in range(10)]
    entries.append({"prompt": "escape", "file": "../outside.png", "rewards": {}})
    (run / "samples" / "after.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n{torn")
    pictures, table = runs_tab.gallery_page(run, "after", 2, size=8)
    assert pictures == [] and table.count("<tr>") == 4 and "s8" in table and "s0" not in table
    assert runs_tab.picture_of(run, {"file": "../outside.png"}) is None
    assert "no before gallery" in runs_tab.gallery_page(run, "before", 1)[1]
    coloured = runs_tab.sample_html({"text": "12", "tokens": ["1", "2"], "steps": [1, 0]})
    assert coloured.count('class="mm-token"') == 2 and 'data-step="1"' in coloured
    metrics = [json.loads(line) for line in (toy_run / "metrics.jsonl").read_text().splitlines()]
    keys = runs_tab.reward_keys(metrics)
    assert "reward/mean" in keys and "reward/sequence_match/mean" in keys
    frame = runs_tab.curve_frame(metrics, ["reward/mean"])
    assert list(frame["step"]) == [1, 2, 3, 4] and set(frame["metric"]) == {"reward/mean"}
