"""Training: one loop (``loop``) for two tasks, pretraining (``pretraining``) and CTC fine-tuning
(``finetuning``); the run log (``runlog``) and the schedule (``schedule``) beside it."""

from streamssl.train.loop import Runtime, Trainer, run
from streamssl.train.pretraining import PretrainTask, pretrain, pretrain_trainer
from streamssl.train.schedule import noam_lambda, step_seed

__all__ = ["Runtime", "Trainer", "run", "PretrainTask", "pretrain", "pretrain_trainer", "noam_lambda", "step_seed"]
