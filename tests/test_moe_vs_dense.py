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
