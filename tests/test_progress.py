"""The Trainer's progress bar: elapsed and remaining time for training, no leftover evaluation bar."""

from __future__ import annotations

import re

from conftest import RandomTokens, tiny_model
from tqdm.auto import tqdm

import hf_moe_routers as H
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments, callbacks
from hf_moe_routers.trainers.callbacks import ConciseProgressCallback

#: tqdm's ``[elapsed<remaining, rate]``: the ETA is the time after ``<``.
ETA = re.compile(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+(?:it/s|s/it)\]")


def test_three_step_run_prints_a_bar_with_an_eta_and_erases_evaluation_bars(tmp_path, capsys, monkeypatch):
    bars: list[dict] = []  # the keyword arguments of every bar the callback opens

    def recording_tqdm(*args, **kwargs):
        bars.append(kwargs)
        return tqdm(*args, **kwargs)

    monkeypatch.setattr(callbacks, "tqdm", recording_tqdm)
    model = H.patch_moe_routers(tiny_model("mixtral"), H.LinearRouterConfig())
    args = MoERouterTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        max_steps=3,
        logging_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=False,
        router_plots=False,
        seed=0,
    )
    trainer = MoERouterTrainer(
        model=model, args=args, train_dataset=RandomTokens(12), eval_dataset=RandomTokens(6, seed=1)
    )
    assert any(type(c) is ConciseProgressCallback for c in trainer.callback_handler.callbacks)
    trainer.train()
    trainer.evaluate()  # the scripts' final evaluation, outside training
    err = capsys.readouterr().err

    drawings = [d for d in re.split(r"[\r\n]", err) if d.strip()]
    finished = [d for d in drawings if d.lstrip().startswith("train: 100%|") and "3/3" in d]
    assert finished, err
    assert ETA.search(finished[-1]), finished[-1]
    # One training bar, and one evaluation bar per evaluation (at step 3 and the final one), each
    # erased when done (leave=False): tqdm's own default keeps the final evaluation's bar on screen.
    assert [bar["desc"] for bar in bars] == ["train", "eval", "eval"]
    assert [bar.get("leave", True) for bar in bars[1:]] == [False, False]
    assert any(d.lstrip().startswith("eval:") for d in drawings), err
