"""Exits that pay (issue 9): per-level normalisation of the shared jump, the centred selection
score, the learned gate, the calibration search and ``onejump agreement`` on a tiny model."""

from __future__ import annotations

import pytest
import torch
from support.models import build_tiny, randomized

from shortcuts.artifact import JumpArtifact
from shortcuts.calibration import StoredCalibration
from shortcuts.calibration.costs import CostModel
from shortcuts.calibration.replay import bootstrap_lower_bound, replay
from shortcuts.calibration.search import search
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.settings import ExitSettings
from shortcuts.heads import HeadContext, jump_logits
from shortcuts.jump import JumpConfig, LowRankJumps, cosine_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def level_normed(d: int, rank: int, levels: int, seed: int = 0) -> LowRankJumps:
    g = torch.Generator().manual_seed(seed)
    jump = randomized(LowRankJumps(JumpConfig(d, rank), n=1), seed)
    mean, var = torch.randn(levels, d, generator=g), torch.rand(levels, d, generator=g) + 0.2
    return jump.with_level_norm(mean, var)


# --- per-level normalisation ------------------------------------------------------------------------
def test_level_norm_is_each_levels_own_batchnorm() -> None:
    """Level i of an (m, B, d) input is standardised with level i's statistics, then the shared
    BN affine, A and B; ``at_level(i)`` is the same jump as a plain bank of one."""
    jump = level_normed(16, 4, levels=3)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    mean, var = jump.level_norm  # type: ignore[misc]
    for i in range(3):
        z = (x[i] - mean[i]) / torch.sqrt(var[i] + jump.config.bn_eps) * jump.bn_weight[0] + jump.bn_bias[0]
        want = z @ jump.lora_A[0].T @ jump.lora_B[0].T + jump.bias[0]
        torch.testing.assert_close(jump(x)[i], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(jump.at_level(i)(x[i : i + 1])[0], want, rtol=1e-5, atol=1e-5)
        assert jump.at_level(i).level_norm is None
    assert jump.num_parameters() == 2 * 16 * 4 + 4 + 16 + 2 * 16 * 3  # 2·d per level, counted


def test_level_norm_fold_equals_unfolded() -> None:
    """z = A·(h ⊙ scale_l) + c_l (one d-sized scale per level, A shared) equals A·BN_l(h)."""
    jump = level_normed(16, 4, levels=3, seed=2)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(3))
    scale, c = jump.level_folded()
    assert scale.shape == (3, 16)
    assert c.shape == (3, 4)
    folded = x * scale[:, None] @ jump.lora_A[0].T + c[:, None]
    torch.testing.assert_close(folded, jump.project(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_exit_head_folds_level_norm(arch: str, tmp_path) -> None:
    """The engine's fused check on a level-normalised jump equals lm_head(norm(jump_l(h))) at every
    level, also after an artifact round trip (format /2)."""
    lm = build_tiny(arch)
    jump = level_normed(lm.hidden_size, 4, levels=lm.num_layers - 1, seed=4)
    art = JumpArtifact(jump, "tiny", lm.fingerprint(), lm.num_layers, 1, [0.0], "words")
    loaded = JumpArtifact.load(art.save(tmp_path / "j.safetensors"))
    assert loaded.metadata()["format"] == "onejump.jump/2"
    head, ctx = ExitHead(lm, loaded.jump), HeadContext.from_model(lm)
    h = torch.randn(lm.num_layers - 1, 3, lm.hidden_size, generator=torch.Generator().manual_seed(5))
    together = jump_logits(jump, h, ctx)  # all levels at once, each with its own statistics
    for level in range(1, lm.num_layers):
        want = ctx.full(jump.at_level(level - 1)(h[level - 1 : level])[0])
        torch.testing.assert_close(head(h[level - 1], level), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together[level - 1], want, rtol=1e-4, atol=1e-4)


def test_plain_artifact_keeps_format_1(tmp_path) -> None:
    lm = build_tiny("llama")
    jump = randomized(LowRankJumps(JumpConfig(lm.hidden_size, 4), n=1))
    art = JumpArtifact(jump, "tiny", lm.fingerprint(), lm.num_layers, 1, [0.0], "words")
    loaded = JumpArtifact.load(art.save(tmp_path / "j.safetensors"))
    assert loaded.metadata()["format"] == "onejump.jump/1"
    assert loaded.jump.level_norm is None


# --- the centred score ---------------------------------------------------------------------------------
def test_centred_score_ignores_the_common_direction() -> None:
    """Final states sharing a large common direction: the paper's score gives a constant predictor
    (the mean) nearly full marks; centred on the mean it scores 0, and a predictor of the
    sample-specific part scores full marks."""
    g = torch.Generator().manual_seed(0)
    common = 10 * torch.randn(32, generator=g)
    final = common + torch.randn(200, 32, generator=g)
    mean = final.mean(0)
    constant = mean.expand(1, 200, 32)
    assert float(cosine_score(constant, final)) / 200 > 0.9
    assert float(cosine_score(constant, final, center=mean)) == 0.0
    assert float(cosine_score(final[None], final, center=mean)) == pytest.approx(200, rel=1e-5)
    noisy = final + 3 * torch.randn(200, 32, generator=g)
    assert float(cosine_score(noisy[None], final, center=mean)) < float(cosine_score(noisy[None], final)) - 50


# --- the learned gate ------------------------------------------------------------------------------------
def test_head_stats_and_features() -> None:
    from shortcuts.engine.learned_gate import FEATURES, feature_names, gate_features

    g = torch.Generator().manual_seed(0)
    logits, h, h_in = torch.randn(5, 50, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    prev_top = torch.softmax(logits, -1).argmax(-1)
    prev_top[0] += 1
    feats, top, conf = gate_features(logits, 3, 6, h, h_in, prev_top, torch.full((5,), 0.25))
    p = torch.softmax(logits, -1).sort(-1, descending=True).values
    assert feats.shape == (5, len(FEATURES) + 5)
    assert len(feature_names(6)) == feats.shape[1]
    torch.testing.assert_close(conf, p[:, 0])
    torch.testing.assert_close(feats[:, 1], p[:, 0] - p[:, 1])  # margin
    torch.testing.assert_close(feats[:, 2], torch.log(p[:, 0] / (1 - p[:, 0])))  # log-odds
    assert feats[:, 3].eq(0.5).all()  # level 3 of 6
    assert feats[:, 4].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]  # agrees with the previous check's top-1
    torch.testing.assert_close(feats[:, 5], (h - h_in).norm(dim=-1) / h_in.norm(dim=-1))
    assert feats[:, 6].eq(0.25).all()
    assert feats[:, 7:].argmax(-1).eq(2).all()  # one-hot of level 3 (levels 1..5)
    first, _, _ = gate_features(logits, 1, 6, h, h_in, None, torch.ones(5))
    assert first[:, 4].eq(0).all()


def test_learned_gate_scores_round_trips_and_fits() -> None:
    from shortcuts.engine.learned_gate import LearnedGate

    g = torch.Generator().manual_seed(1)
    n_feat = 7 + 5
    gate = LearnedGate(torch.randn(n_feat, generator=g), 0.3, num_layers=6, threshold=0.8)
    x = torch.randn(4, 3, n_feat, generator=g)
    torch.testing.assert_close(gate.score(x), torch.sigmoid(x @ gate.weights + 0.3))
    assert gate.fires(x).equal(gate.score(x) >= 0.8)
    again = LearnedGate.from_dict(gate.to_dict())
    torch.testing.assert_close(again.score(x), gate.score(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the features"):
        LearnedGate(torch.zeros(3), 0.0, num_layers=6)
    with pytest.raises(ValueError, match="not a learned gate"):
        LearnedGate.from_dict({"kind": "confidence"})
    # logistic regression recovers a separable rule: y = 1 when feature 0 (confidence) > 0.5
    feats = torch.rand(2000, n_feat, generator=g)
    fitted = LearnedGate.fit(feats, feats[:, 0] > 0.5, num_layers=6, l2=1e-4)
    assert float(((fitted.score(feats) >= 0.5) == (feats[:, 0] > 0.5)).float().mean()) > 0.97


def _tiny_table(seed: int = 0):
    from shortcuts.calibration.table import LevelTable

    g = torch.Generator().manual_seed(seed)
    n, levels = 40, 5
    conf = torch.rand(n, levels, generator=g)
    margin = conf * torch.rand(n, levels, generator=g)
    top = torch.randint(0, 3, (n, levels), generator=g)
    final = torch.randint(0, 3, (n,), generator=g)
    return LevelTable(conf, torch.zeros(n, levels), top, final, torch.arange(n) // 8, levels + 1, margin,
                      torch.rand(n, levels, generator=g), torch.rand(n, generator=g))


def _approximate(gate: str, threshold: float, min_layer: int, stride: int) -> ExitSettings:
    return ExitSettings(mode="approximate", gate=gate, threshold=threshold, min_layer=min_layer,  # type: ignore[arg-type]
                        stride=stride)


def test_learned_replay_matches_the_confidence_gate_when_it_is_one() -> None:
    """A learned gate whose log-odds is the confidence's fires exactly where the confidence gate does."""
    from shortcuts.engine.learned_gate import FEATURES, LearnedGate
    table = _tiny_table()
    w = torch.zeros(len(FEATURES) + 5)
    w[FEATURES.index("log_odds")] = 1.0
    gate = LearnedGate(w, 0.0, num_layers=6)
    for t, m, stride in ((0.5, 1, 1), (0.7, 2, 2), (0.9, 1, 3)):
        learned = replay(table, _approximate("learned", t, m, stride), gate)
        conf = replay(table, _approximate("confidence", t, m, stride))
        assert learned[0].equal(conf[0])
        assert learned[1].equal(conf[1])


def test_learned_replay_uses_the_previous_tokens_confidence_step_by_step() -> None:
    """prev_confidence is the confidence that decided the previous step of the same prompt: replayed
    step by step, checked against a plain loop."""
    from shortcuts.engine.learned_gate import FEATURES, LearnedGate, build_features
    table = _tiny_table(3)
    w = torch.zeros(len(FEATURES) + 5)
    w[FEATURES.index("confidence")], w[FEATURES.index("prev_confidence")] = 4.0, -3.0
    gate, s = LearnedGate(w, 0.0, num_layers=6), _approximate("learned", 0.6, 2, 1)
    level, picked = replay(table, s, gate)
    used = None
    for i in range(len(table)):
        first = i % 8 == 0
        prev = table.final_conf[i] if first else used
        exit_level, pick, used = 6, table.final_top[i], table.final_conf[i]
        for lv in s.check_levels(6):
            f = build_features(table.confidence[i, lv - 1], table.margin[i, lv - 1], torch.tensor(lv),
                               torch.tensor(0.0), table.delta[i, lv - 1], prev, 6)
            if lv > s.min_layer:
                f[FEATURES.index("agree_prev")] = float(table.top[i, lv - 1] == table.top[i, lv - 2])
            if gate.score(f) >= 0.6:
                exit_level, pick, used = lv, table.top[i, lv - 1], table.confidence[i, lv - 1]
                break
        assert int(level[i]) == exit_level
        assert int(picked[i]) == int(pick)


def test_search_ranks_by_predicted_speed_and_keeps_the_bound() -> None:
    table = _tiny_table(5)
    table.top[:, 3:] = table.final_top[:, None]  # levels 4 and 5 always right
    found = search(table, 0.9, {"confidence": CostModel(check=0.1, head=2.0)}, None, (1, 2, 4), (1, 2))
    best = found["confidence"]
    assert best.predicted_speedup > 1.0
    level, picked = replay(table, best.exit_settings())
    assert bootstrap_lower_bound(picked == table.final_top, table.prompt) >= 0.9
    assert best.lower_bound >= 0.9


# --- onejump agreement and calibrate on a tiny model --------------------------------------------------------
def test_agreement_command_on_a_tiny_model(tiny_folder, word_corpus, tmp_path, make_tiny, monkeypatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """From another working directory, plain-text and .jsonl prompts, the stored setting or the flags."""
    import json

    from support.models import tiny_artifact

    from shortcuts.cli import main

    jump = tiny_artifact(make_tiny("llama")).save(tmp_path / "jump.safetensors")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in word_corpus.read_text().splitlines()[:5]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base = ["agreement", "--model", str(tiny_folder), "--jump", str(jump), "--max-prompts", "4", "--new-tokens", "6"]
    assert main([*base, "--prompts", str(word_corpus), "--json", "--threshold", "0.0", "--min-layer", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("agreement", "agreement_lower", "mean_exit_layer", "num_layers", "exit_rate", "ceiling_speedup",
                "predicted_speedup", "setting"):
        assert key in out
    keys = ("gate", "threshold", "min_layer", "stride")
    assert {k: out["setting"][k] for k in keys} == {"gate": "confidence", "threshold": 0.0, "min_layer": 1, "stride": 1}
    assert out["exit_rate"] == 1.0  # threshold 0 exits at the first check
    assert out["mean_exit_layer"] == 1.0
    assert out["tokens"] == 4 * 5
    assert 0.0 <= out["agreement_lower"] <= out["agreement"] <= 1.0
    assert out["ceiling_speedup"] >= 1.0
    assert main([*base, "--prompts", str(jsonl), "--json", "--threshold", "1.0"]) == 0
    never = json.loads(capsys.readouterr().out)
    assert (never["agreement"], never["exit_rate"], never["mean_exit_layer"]) == (1.0, 0.0, 4.0)
    assert never["predicted_speedup"] == pytest.approx(1.0)
    assert main([*base, "--prompts", str(jsonl)]) == 0
    assert "agreement" in capsys.readouterr().out
    assert main([*base, "--prompts", str(jsonl), "--gate", "learned"]) == 2
    assert "no learned gate" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "missing.txt")]) == 2


def test_calibrate_learned_gate_and_strides_then_agreement_replays_it(tiny_folder, word_corpus, tmp_path,
                                                                      make_tiny, capsys) -> None:
    import json

    from support.models import tiny_artifact

    from shortcuts.cli import main

    jump = tiny_artifact(make_tiny("llama")).save(tmp_path / "jump.safetensors")
    out = tmp_path / "calibrated.safetensors"
    args = ["calibrate", "--model", str(tiny_folder), "--jump", str(jump), "--corpus", str(word_corpus),
            "--prompts", "10", "--new-tokens", "6", "--offset", "0", "--out", str(out), "--target", "0.5",
            "--gates", "confidence", "entropy", "learned", "--gate-corpus", str(word_corpus), "--gate-prompts", "10",
            "--strides", "1", "2", "--min-layers", "1", "2"]
    assert main(args) == 0
    capsys.readouterr()
    extra = JumpArtifact.load(out).extra
    assert extra["gate"]["kind"] == "learned"
    assert set(extra["calibration_search"]) == {"confidence", "entropy", "learned"}
    assert "exit_setting" not in extra
    stored = StoredCalibration.from_extra(extra).lookup("none")[0]
    assert stored is not None
    assert stored.approximate is not None
    best = {**stored.approximate.to_dict(), **stored.approximate.measured}  # the best of every gate and stride
    assert best["predicted_speedup"] == max(c["predicted_speedup"] for c in extra["calibration_search"].values())
    assert main(["agreement", "--model", str(tiny_folder), "--jump", str(out), "--prompts", str(word_corpus),
                 "--max-prompts", "4", "--new-tokens", "6", "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    keys = ("gate", "threshold", "min_layer", "stride")
    assert {k: replayed["setting"][k] for k in keys} == {k: best[k] for k in keys}
    assert replayed["setting"]["source"] == "calibration"


def test_article_split_never_shares_an_article(tmp_path) -> None:
    import json

    from shortcuts.prompts import article_split

    rows = [{"text": f"sentence {i} of article {i % 40}.", "title": f"A{i % 40}"} for i in range(400)]
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit, val = article_split(path)
    assert len(fit) + len(val) == 400
    assert val
    fit_titles = {t.rsplit(" ", 1)[-1] for t in fit}
    assert not fit_titles & {t.rsplit(" ", 1)[-1] for t in val}


def test_exits_ship_keeps_each_artifacts_base_model(tiny_folder, word_corpus, tmp_path) -> None:
    """The calibrated artifact names the model it was fitted on (it used to be stamped SmolLM2's
    folder by default, whatever the traces' model), unless --base-model says otherwise."""
    import json

    from support.models import tiny_artifact

    from shortcuts.adapter import CausalLM
    from shortcuts.calibration.table import continuations
    from shortcuts.lab import exits_ship
    from shortcuts.lab.traces import trace_states
    from shortcuts.prompts import first_usable

    lm = CausalLM.load(tiny_folder)
    prompts = first_usable(lm, word_corpus.read_text().splitlines(), 6, 3, 12)
    traces = trace_states(lm, prompts, continuations(lm, prompts, 5))
    src = tmp_path / "traces"
    for split in ("fit", "val", "test", "ood"):
        traces.save(src / f"traces-{split}.safetensors")
    (src / "traces.json").write_text(json.dumps({"model": str(tiny_folder), "new_tokens": 5}))
    art = tiny_artifact(lm)
    art.base_model = "elsewhere/tiny-llama"
    path = art.save(tmp_path / "jump.safetensors")
    args = ["--traces", str(src), "--jumps", f"j={path}", "--gates", "confidence", "--strides", "1", "--repeats", "2"]
    exits_ship.main([*args, "--out", str(tmp_path / "a")])
    shipped = JumpArtifact.load(tmp_path / "a" / "j.safetensors")
    assert shipped.base_model == "elsewhere/tiny-llama"
    stored = StoredCalibration.from_extra(shipped.extra).lookup("none")[0]
    assert stored is not None
    assert stored.approximate is not None
    assert stored.approximate.gate == "confidence"
    exits_ship.main([*args, "--out", str(tmp_path / "b"), "--base-model", "named/here"])
    assert JumpArtifact.load(tmp_path / "b" / "j.safetensors").base_model == "named/here"
