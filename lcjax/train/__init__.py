"""Training: optimizer, train step, sharded state, checkpoints, metrics, and the loop."""
from lcjax.train.checkpoint import Checkpointer, abstract_like
from lcjax.train.loop import ModelFns, TrainResult, check_config, default_model_fns, train
from lcjax.train.metrics import MetricsWriter, read_jsonl
from lcjax.train.optimizer import make_optimizer, make_schedule
from lcjax.train.state import abstract_state, init_state, state_shardings
from lcjax.train.step import BATCH_KEYS, grads_and_metrics, jit_train_step, loss_sums, train_step
