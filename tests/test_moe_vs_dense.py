"""The MoE-versus-dense experiment's arms, step interpolation and table (no training here)."""

import pytest

from experiments import moe_vs_dense as exp


@pytest.mark.parametrize("spec", ["configs/speech.py", "configs/translation.py", "configs/lm.py"])
def test_dense_active_arm_matches_the_active_ffn_width(spec):
    base = exp.load_config(spec)
    width = exp.ffn_widths(base)["active"]
    moe = base.model.moe
    assert width == moe.top_k * (moe.d_ff or base.model.d_ff) + (moe.num_shared_experts or 0) * (
        moe.shared_d_ff or moe.d_ff or base.model.d_ff
    )
    dense = exp.arm_config(base, "dense_active", 100, 10)
    assert dense.train.num_train_steps == 100 and dense.train.eval_every == 10
    if dense.model.moe.layers == ():  # a plain dense model of that width
        assert dense.model.d_ff == width
    else:  # one-expert layers of that width where the MoE layers were; other blocks unchanged
        assert (dense.model.moe.num_experts, dense.model.moe.top_k, dense.model.moe.d_ff) == (1, 1, width)
        assert dense.model.moe.capacity_factor is None and dense.model.d_ff == base.model.d_ff
    assert exp.arm_config(base, "moe", 100, 10).model.moe.to_dict() == base.model.moe.to_dict()


def test_steps_to_reach_interpolates_between_evaluations():
    steps, losses = [0, 100, 200, 300], [4.0, 3.0, 2.0, 1.5]
    assert exp.steps_to_reach(steps, losses, 2.5) == pytest.approx(150.0)
    assert exp.steps_to_reach(steps, losses, 4.5) == 0.0
    assert exp.steps_to_reach(steps, losses, 1.0) is None


def test_table_shows_task_scores_every_arm_has():
    def arm(loss, wer):
        final = {"val_loss": loss, "val_perplexity": 2.0, "test_loss": loss, "train_seconds": 10.0}
        final.update(test_beam_wer=wer)
        return {"params": {"total": 10, "active": 5}, "ffn_width": 8, "final": final, "steps": 100}

    results = {"moe": arm(1.0, 40.0), "dense_active": arm(1.1, 45.5)}
    summary = {"steps": 100, "dense_active_final_val_loss": 1.1, "moe_steps_to_dense_active_final": 60.0}
    text = exp.table(results, summary)
    assert "test_beam_wer" in text and "45.50" in text and "at step 60 of 100 (60% of the steps" in text
    del results["moe"]["final"]["test_beam_wer"]
    assert "test_beam_wer" not in exp.table(results, summary)


def _results_json(tmp_path, arms: dict, fingerprint: str = "f0") -> str:
    import json

    summary = {"config": "configs/lm.py", "overrides": [], "steps": 100, "data_fingerprint": fingerprint}
    (tmp_path / "results.json").write_text(json.dumps({"summary": summary, "arms": arms}))
    return str(tmp_path)


def test_reuse_takes_an_arm_only_with_the_same_training_config_and_data(tmp_path):
    base16 = exp.load_config("configs/lm.py", ["model.moe.num_experts=16"])
    base32 = exp.load_config("configs/lm.py", ["model.moe.num_experts=32"])
    dense16 = exp.arm_config(base16, "dense_active", 100, 10)
    moe16 = exp.arm_config(base16, "moe", 100, 10)
    stored = {
        "dense_active": {"config": exp.canonical(dense16), "final": {"val_loss": 2.0}},
        "moe": {"config": exp.canonical(moe16), "final": {"val_loss": 1.9}},
    }
    reuse = _results_json(tmp_path, stored)
    # The dense arm has no MoE layer: the expert count it never reads does not make it another run.
    assert exp.reusable_arm(reuse, "dense_active", exp.arm_config(base32, "dense_active", 100, 10), "f0")
    assert exp.reusable_arm(reuse, "moe", exp.arm_config(base32, "moe", 100, 10), "f0") is None
    assert exp.reusable_arm(reuse, "moe", moe16, "f0")["final"]["val_loss"] == 1.9
    assert (
        exp.reusable_arm(reuse, "moe", exp.arm_config(base16, "moe", 100, 20), "f0") is None
    )  # eval cadence
    assert exp.reusable_arm(reuse, "moe", moe16, "other data") is None
    assert exp.reusable_arm(str(tmp_path / "missing"), "moe", moe16, "f0") is None


def test_legacy_results_rebuild_the_arm_config_from_the_command(tmp_path):
    base = exp.load_config("configs/lm.py")
    dense = exp.arm_config(base, "dense_active", 100, 10)
    reuse = _results_json(tmp_path, {"dense_active": {"curve_steps": [10, 20], "final": {}}})
    assert exp.stored_arm_config(
        {
            "summary": {"config": "configs/lm.py", "overrides": [], "steps": 100},
            "arms": {"dense_active": {"curve_steps": [10, 20]}},
        },
        "dense_active",
    ) == exp.canonical(dense)
    assert exp.reusable_arm(reuse, "dense_active", dense, "f0") is not None
    assert exp.stored_arm_config({"summary": {}, "arms": {"moe_70pct": {}}}, "moe_70pct") is None


def test_budget_arms_get_their_own_schedule_and_a_verdict_line():
    base = exp.load_config("configs/lm.py")
    assert exp.budget_arm_name(0.7) == "moe_70pct"
    short = exp.arm_config(base, "moe", round(0.7 * 1500), 100)
    assert short.train.num_train_steps == 1050 and short.optim.warmup_steps == base.optim.warmup_steps

    def arm(loss, steps):
        final = {"val_loss": loss, "val_perplexity": 2.0, "test_loss": loss, "train_seconds": 10.0}
        return {"params": {"total": 10, "active": 5}, "ffn_width": 8, "final": final, "steps": steps}

    results = {"moe": arm(1.0, 100), "dense_active": arm(1.1, 100), "moe_70pct": arm(1.05, 70)}
    summary = {
        "steps": 100,
        "dense_active_final_val_loss": 1.1,
        "moe_steps_to_dense_active_final": 80.0,
        "budgets": {"moe_70pct": {"steps": 70, "final_val_loss": 1.05, "reaches_dense_active_final": True}},
    }
    text = exp.table(results, summary)
    assert "| moe_70pct |" in text
    assert "Trained for 70 steps with a schedule of that length (moe_70pct), the MoE reaches" in text


@pytest.mark.parametrize("budgets", ["1.5", "0", "seventy"])
def test_bad_budgets_exit_2_with_the_flag_named(budgets, capsys):
    with pytest.raises(SystemExit) as exit_info:
        exp.main([f"--budgets={budgets}"])
    assert exit_info.value.code == 2 and "--budgets=" in capsys.readouterr().err
