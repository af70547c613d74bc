"""THE training loop. Every engine and launcher ends up here, in ``run``.

A run is three parts: ``setup`` (data, model, speed features, engine, tracker, resume) returns a ``Run``; the
step (zerotune.step.TrainStep) launches one optimizer step; ``train_loop`` steps, logs, evaluates, saves and
stops. The loop never names a strategy: what differs between engines is a capability of the Strategy
(``drops_steps_on_device``, ``own_precision``, ``gathers_per_module``). How the loss is normalised across
micro-batches and ranks: zerotune.step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from zerotune import adapters, speed
from zerotune.checkpoints import check_engine_matches, newest_checkpoint, read_rank_data, read_trainer_state, \
    restore_rng, save_checkpoint, verified_restore
from zerotune.config import RunConfig, dump_yaml
from zerotune.data.batches import BatchPlan, collate, even_batches
from zerotune.data.prepare import prepare_data
from zerotune.errors import ZerotuneError
from zerotune.model import DTYPES, load_tokenizer
from zerotune.objectives import create_objective, pair_scorer
from zerotune.objectives.step import REFERENCE_FILE, PreferenceStep, Reference, attach_reference, evaluate_pairs, \
    frozen_reference, packed_row_length
from zerotune.resolve import Machine, Settings, choose_strategy, resolve
from zerotune.speed.step_graphs import graph_learning_rate
from zerotune.step import TrainStep, forward_precision, learning_rate_factor, token_loss_sum
from zerotune.step_io import to_device
from zerotune.step_log import NonFiniteError, StepLog  # noqa: F401 - NonFiniteError: part of this API
from zerotune.stopping import StopSignals
from zerotune.strategies import create_strategy
from zerotune.strategies.process_group import join_process_group, leave_process_group
from zerotune.tracking import NullTracker, Tracker

RUN_METADATA = "zerotune.json"
RESOLVED_FILE = "resolved.yaml"


@dataclass
class RunResult:
    losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    output_dir: Path | None = None
    strategy: str = ""
    mlflow_run_id: str | None = None
    resumed_from: int | None = None  # the checkpoint step this run continued from
    preempted: bool = False  # stopped by SIGTERM/SIGINT after writing a checkpoint
    skipped_steps: int = 0
    checkpoint: Path | None = None  # the newest checkpoint this run wrote


class RunSession:
    """What a launcher tells the loop: where to resume from, and whom to tell about a new checkpoint.
    Here: --resume, or a restart by torch elastic (--max-restarts), continues from the newest checkpoint."""

    def restore_from(self, config: RunConfig, output_dir: Path) -> Path | None:
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        return newest_checkpoint(output_dir) if config.checkpoint.resume or restarted else None

    def checkpoint_saved(self, step: int, path: Path, metrics: dict, is_main: bool) -> None:
        pass


@dataclass
class Run:
    """One worker's training, as setup() builds it: what the loop reads and the result it fills."""

    config: RunConfig  # the user's, as config.yaml holds it
    settings: Settings  # what every "auto" became (zerotune.resolve), as resolved.yaml holds it
    strategy: object  # a zerotune.strategies Strategy
    output_dir: Path
    tokenizer: object
    data: object  # zerotune.data.prepare.PreparedData
    plan: BatchPlan
    total_steps: int
    tracker: Tracker | NullTracker
    result: RunResult
    start_step: int = 0
    state: dict = field(default_factory=dict)  # the trainer state of the checkpoint resumed from
    model: torch.nn.Module | None = None
    step: TrainStep | None = None
    speedups: speed.Installed | None = None
    loss_head: object | None = None
    precision: object = contextlib.nullcontext
    trainable: list = field(default_factory=list)  # (name, element count) of every trainable tensor
    objective: object | None = None  # a preference objective (zerotune.objectives); None: SFT
    reference: object | None = None  # its reference model's scores (zerotune.objectives.step.Reference)
    scorer: object | None = None  # how a pair batch is scored (zerotune.objectives.logps.PairScorer)
    stream: object | None = None  # --streaming: this rank's zerotune.data.streaming.TrainingStream (data.train empty)

    def micro_batches(self, step: int) -> list[list]:
        """This rank's micro-batches of the global batch for ``step``: lists of examples."""
        if self.stream:  # the stream's next rows; a resumed stream starts where its checkpoint left off
            return self.stream.micro_batches(self.plan.micro_batch_size, self.plan.grad_accum)
        epoch, step_in_epoch = divmod(step, self.plan.steps_per_epoch)
        micro = self.plan.micro_batches(epoch, step_in_epoch, self.strategy.rank)
        return [[self.data.train[i] for i in indices] for indices in micro]

    def close(self) -> None:
        if self.stream:
            self.stream.close()  # its reader thread


def run(config: RunConfig, show_progress: bool = True, session: RunSession | None = None,
        settings: Settings | None = None) -> RunResult:
    """Train with ``config`` in this process, which is one worker of possibly many. ``settings``: as the
    launcher resolved them (zerotune.resolve); None resolves them here, for a caller that is its own launcher."""
    need_group = (settings.strategy if settings else choose_strategy(config, 1)) != "single"
    place = join_process_group(config.distributed.use_cpu, need_group=need_group)
    if settings is None:
        from zerotune.preflight import one_batch_shape

        settings = resolve(config, Machine.of(place.device), place.world_size,
                           fixed_shapes=lambda: one_batch_shape(config))
    strategy = create_strategy(settings.strategy, config, place.device, place.rank, place.world_size)
    session = session or RunSession()
    try:
        with StopSignals() as signals:
            training = setup(config, settings, strategy, show_progress, session)
            with contextlib.closing(training):
                return train_loop(training, signals, session)
    except BaseException as error:
        # The traceback would keep the loop's locals (a DDP model holds the process group) alive past
        # leave_process_group; freed then, gloo's group can deadlock at exit. Free them while it exists.
        traceback.clear_frames(error.__traceback__)
        gc.unfreeze()
        gc.collect()
        raise
    finally:
        gc.unfreeze()  # the loop froze the setup's objects; give them back to the collector
        strategy.close()
        leave_process_group()


def setup(config: RunConfig, settings: Settings, strategy, show_progress: bool, session: RunSession) -> Run:
    """Data, resume point and tracker, then the model with its adapters, speed features and engine."""
    torch.manual_seed(config.train.seed)
    training = _prepare(config, settings, strategy, show_progress, session)
    _build_model(training)
    if training.objective and training.objective.uses_reference and config.objective.reference == "precomputed":
        _attach_reference(training)  # before _restore: a fresh start scores with the model as loaded
    if training.state:
        _restore(training)
    training.tracker.start(training.total_steps, initial_step=training.start_step)
    if training.data.eval and config.train.eval_every and not training.state:
        _evaluate(training, 0)  # where the base model starts
    return training


def _prepare(config: RunConfig, settings: Settings, strategy, show_progress: bool, session: RunSession) -> Run:
    output_dir = Path(config.output.dir)
    tokenizer = load_tokenizer(config.model)
    seed = config.train.seed
    stream = None
    if config.data.streaming:  # each worker reads its own share of the stream (max_steps is set: config_checks)
        from zerotune.data.streaming import streamed_data

        data, stream = streamed_data(config.data, tokenizer, strategy.rank, strategy.world_size,
                                     strategy.all_gather_object, config.train.batch_size * config.train.grad_accum)
    else:  # each worker tokenizes its own slice of the records; the engine's all-gather assembles the whole set
        data = prepare_data(config.data, tokenizer, seed, strategy.rank, strategy.world_size,
                            strategy.all_gather_object, pairs=config.objective.name != "sft")
    plan = BatchPlan(len(data.train), config.train.batch_size, config.train.grad_accum, strategy.world_size, seed)
    if not stream:
        plan.check(config.data.path)
    total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * plan.steps_per_epoch))
    # Every rank reads its share of the checksums; all ranks agree on the newest intact checkpoint.
    restore = verified_restore(session.restore_from(config, output_dir), output_dir, strategy)
    state = read_trainer_state(restore) if restore else {}
    if restore:
        check_engine_matches(state, restore, strategy, len(data.train))
        state["restore"] = restore
        if stream:
            stream.resume(read_rank_data(restore, strategy.rank, strategy.world_size))
    start_step = state.get("step", 0)
    # A fresh start keeps nothing a failed earlier attempt (a restart without a checkpoint) logged.
    tracker = Tracker(config, output_dir, show_progress, resume_step=start_step if restore else -1,
                      resume_run_id=state.get("mlflow_run_id")) if strategy.is_main else NullTracker()
    result = RunResult(output_dir=output_dir, strategy=strategy.name, mlflow_run_id=tracker.run_id,
                       losses=list(state.get("losses", [])), eval_losses=list(state.get("eval_losses", [])),
                       skipped_steps=state.get("skipped_steps", 0), resumed_from=start_step if restore else None)
    training = Run(config, settings, strategy, output_dir, tokenizer, data, plan, total_steps, tracker, result,
                   start_step=start_step, state=state, objective=create_objective(config.objective), stream=stream)
    if strategy.is_main:
        (output_dir / "config.yaml").write_text(dump_yaml(config))
        (output_dir / RESOLVED_FILE).write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))
        tracker.note("settings as resolved (resolved.yaml):\n" + settings.table())
        source = config.data.path or ("of the mixture" if config.data.mix else
                                      "the bundled English+Spanish sample (no --data given)")
        tracker.note(f"data {source}: streamed, {len(data.eval)} eval examples" if stream else
                     f"data {source}: {data.report.summary()}; {len(data.train)} train / {len(data.eval)} eval"
                     + (f"; {data.packing.summary()}" if data.packing else ""))
        tracker.note(f"engine {strategy.name}, {strategy.world_size} worker(s) on {strategy.device.type}; global "
                     f"batch {plan.global_batch_size} = batch_size {plan.micro_batch_size} x grad_accum "
                     f"{plan.grad_accum} x workers {plan.world_size}; {total_steps} steps")
    return training


def _build_model(training: Run) -> None:
    """Load the base model, apply the adapters, install the speed features, and let the engine wrap it."""
    config, settings, strategy, tracker = training.config, training.settings, training.strategy, training.tracker
    model = strategy.load_base_model(DTYPES[settings.dtype], training.total_steps, settings.attention)
    frozen = frozen_reference(training.objective, model, config.adapter.method, strategy.name,
                              config.objective.reference)
    model = adapters.apply_method(model, config.adapter, config.train.seed)
    # chunked loss, fused projections, the step graphs' attention hint, compiled 4-bit matmuls and layers: one
    # call, in the order speed.install documents (it says, one line each, what it left out and why)
    speedups = speed.install(model, config, settings, precision=forward_precision(strategy, config, model))
    for note in speedups.notes:
        tracker.note(note)
    compiled, graphs = speedups.compiled, speedups.graphs
    training.trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]

    def build_optimizer(params):
        # Fused (CUDA and CPU): one kernel per step, and it can drop a non-finite step on the device (found_inf).
        return torch.optim.AdamW(params, lr=graph_learning_rate(config.train.lr, strategy.device, graphs),
                                 weight_decay=config.train.weight_decay, betas=(0.9, 0.999), eps=1e-8, fused=True,
                                 capturable=graphs)

    def build_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(config, training.total_steps))

    model = strategy.wrap(model, build_optimizer, build_scheduler, training.total_steps)
    model.train()
    if strategy.device.type == "cuda":  # what the model, its shards and the optimizer hold before any step
        tracker.note(f"GPU memory after setup: {torch.cuda.memory_allocated(strategy.device) / 2**30:.2f} GiB "
                     f"on worker {strategy.rank}")
    precision = forward_precision(strategy, config, model, graphs)
    # Compiled layers with packed rows: one row length for every step, so nothing recompiles (rows are nearly
    # full anyway). Unpacked batches vary in length; torch.compile then switches to dynamic shapes.
    # A replayed CUDA graph needs that too, packed or not.
    pad_to = config.data.max_seq_len if (compiled and config.data.packing) or graphs else None
    training.model, training.speedups, training.loss_head, training.precision = model, speedups, \
        speedups.loss_head, precision
    if training.objective:  # pairs, scored against the base with LoRA off or against the frozen copy
        training.scorer = pair_scorer(training.objective, speedups.loss_head)
        frozen_scorer = None
        if frozen is not None and speedups.loss_head is not None:  # the frozen copy's head chunked as the policy's
            from zerotune.speed.chunked_loss import ChunkedLossHead

            frozen_scorer = pair_scorer(training.objective, ChunkedLossHead(frozen, compiled=speedups.compiled))
        training.reference = Reference(strategy, frozen, training.scorer, frozen_scorer)
        training.step = PreferenceStep(model, strategy, training.objective, training.reference,
                                       precision=precision, pad_token_id=training.tokenizer.pad_token_id,
                                       scorer=training.scorer, row_length=packed_row_length(config))
        return
    training.step = TrainStep(model, strategy, loss_head=speedups.loss_head, precision=precision, graphs=graphs,
                              pad_token_id=training.tokenizer.pad_token_id, pad_to=pad_to, note=tracker.note)


def _attach_reference(training: Run) -> None:
    """--reference precomputed: the reference log-probs of every pair, scored once (read back on resume)."""
    path = training.output_dir / REFERENCE_FILE
    if training.state and not path.is_file():
        raise ZerotuneError(f"{path}: missing, and the checkpoint's model has trained, so it cannot score the "
                            "reference again; start a new run in another --output-dir")
    attach_reference(training.model, training.strategy, training.data, training.config.train.batch_size,
                     training.tokenizer.pad_token_id, training.precision, training.output_dir,
                     is_lora=training.config.adapter.method != "full", note=training.tracker.note,
                     scorer=training.scorer, row_length=packed_row_length(training.config))


def _restore(training: Run) -> None:
    """The engine's state and every rank's RNG from the checkpoint found by _prepare."""
    strategy, state = training.strategy, training.state
    restore = state["restore"]
    strategy.load_state(training.model, restore)
    exact = restore_rng(restore, strategy.rank, strategy.device)
    training.tracker.note(f"resumed from {restore} at step {training.start_step}"
                          + ("" if exact else f" (RNG states reseeded: it was written by {state['world_size']} "
                                              "workers)"))
    if not exact:
        torch.manual_seed(training.config.train.seed * 7919 + training.start_step * 31 + strategy.rank)


def train_loop(training: Run, signals: StopSignals, session: RunSession) -> RunResult:
    """Step until the last step or a stop signal; evaluate and save on schedule. Every rank runs the same
    decisions: the stop signal and rank 0's save clock travel in each step's all-reduce (TrainStep's votes)."""
    config, strategy, result = training.config, training.strategy, training.result
    log = StepLog(training)
    clock = SaveClock(config.checkpoint.save_steps, config.checkpoint.save_minutes * 60,
                      training.state.get("elapsed_seconds", 0.0))
    # Everything built so far (model, compiled graphs, data) lives for the whole run: take it out of the garbage
    # collector's view, so a full collection mid-run scans only what the steps allocate (a long pause otherwise).
    gc.freeze()
    for step in range(training.start_step, training.total_steps):
        launched = training.step(step, training.micro_batches(step),
                                 votes=lambda: [signals.requested is not None, strategy.is_main and clock.time_due()])
        if step == training.start_step:  # the first step has traced any compiled layers
            _note_graph_breaks(training)
        log.add(launched)
        stop_votes, time_votes = launched.info.values()[3:5]
        done = step + 1
        last = done == training.total_steps
        stop = stop_votes > 0 and not last
        evaluate_now = training.data.eval and (last or (config.train.eval_every
                                                        and done % config.train.eval_every == 0))
        save_now = stop or clock.step_due(done) or time_votes > 0
        if last or evaluate_now or save_now:
            log.settle()
        if evaluate_now:
            _evaluate(training, done)
        if save_now:
            _save(training, done, clock, session)
        if evaluate_now or save_now:
            log.restart_clock()
        if stop:
            return _stopped(training, done, signals)
    save_outputs(training)
    training.tracker.finish()
    return result


class SaveClock:
    """When checkpoints are due: every ``every_steps`` steps and every ``every_seconds`` of wall time."""

    def __init__(self, every_steps: int, every_seconds: float, elapsed_before: float):
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.last_save = self.started = time.monotonic()
        self.elapsed_before = elapsed_before  # wall time of the runs this one resumed

    def time_due(self) -> bool:
        return bool(self.every_seconds) and time.monotonic() - self.last_save >= self.every_seconds

    def step_due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started


def _note_graph_breaks(training: Run) -> None:
    broken = training.speedups.new_graph_breaks() if training.speedups else None
    if broken:
        training.tracker.note(broken)


def _evaluate(training: Run, step: int) -> None:
    if training.objective:
        metrics = evaluate_pairs(
            training.model, training.strategy, training.objective, training.reference, training.data.eval,
            training.config.train.batch_size, training.tokenizer.pad_token_id, training.precision, training.scorer,
            packed_row_length(training.config))
        training.result.eval_losses.append(metrics["eval_loss"])
        training.tracker.log(step, metrics)
        return
    eval_loss = evaluate(training.model, training.strategy, training.data.eval, training.config.train.batch_size,
                         training.tokenizer.pad_token_id, training.loss_head, training.precision)
    training.result.eval_losses.append(eval_loss)
    training.tracker.log(step, {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})


def _save(training: Run, step: int, clock: SaveClock, session: RunSession) -> None:
    """A checkpoint of everything needed to continue exactly after ``step`` (zerotune.checkpoints)."""
    strategy, plan, result = training.strategy, training.plan, training.result
    # A stream's place is each rank's own (rank_data); a map-style run's follows from the step.
    epochs = {"streaming": True} if training.stream else {
        "epoch": step // plan.steps_per_epoch, "step_in_epoch": step % plan.steps_per_epoch}
    trainer_state = {
        "step": step, **epochs, "examples_seen": step * plan.global_batch_size,
        "global_batch_size": plan.global_batch_size,
        "train_examples": len(training.data.train), "world_size": strategy.world_size, "strategy": strategy.name,
        "format": strategy.checkpoint_format, "losses": result.losses, "eval_losses": result.eval_losses,
        "skipped_steps": result.skipped_steps, "mlflow_run_id": training.tracker.run_id,
        "elapsed_seconds": clock.elapsed(),
    }
    result.checkpoint = save_checkpoint(strategy, training.model, training.output_dir, step, trainer_state,
                                        training.config.checkpoint.keep,
                                        training.stream.position() if training.stream else None)
    clock.saved()
    session.checkpoint_saved(step, result.checkpoint, {"loss": result.losses[-1], "step": step}, strategy.is_main)


def _stopped(training: Run, step: int, signals: StopSignals) -> RunResult:
    result = training.result
    training.tracker.note(f"stopped by {signals.requested or 'a signal on another worker'} after step {step}; "
                          f"checkpoint {result.checkpoint}. Continue with the same command plus --resume")
    training.tracker.finish(status="KILLED")
    result.preempted = True
    return result


@torch.no_grad()
def evaluate(model, strategy, examples, batch_size: int, pad_token_id: int, head=None, precision=None) -> float:
    """Token-weighted mean loss over every eval example, across all ranks (each runs as many forwards: a
    sharding engine gathers weights in every one)."""
    model.eval()
    totals = torch.zeros(2, device=strategy.device)
    for indices, keep in even_batches(len(examples), batch_size, strategy.rank, strategy.world_size):
        batch = to_device(collate([examples[i] for i in indices], pad_token_id), strategy.device)
        with (precision or contextlib.nullcontext)():
            loss_sum, tokens = token_loss_sum(model, batch, head)
        if keep:
            totals += torch.stack([loss_sum, tokens.float()])
    totals = strategy.all_reduce_sum(totals)
    model.train()
    return float(totals[0] / totals[1].clamp(min=1))


def save_outputs(training: Run) -> None:
    """Gather what must be saved (only the adapter for LoRA), write it on rank 0, verify it."""
    config, strategy, model, tracker = training.config, training.strategy, training.model, training.tracker
    method = config.adapter.method
    state = strategy.full_state_dict(model) if method == "full" else strategy.trainable_state_dict(model)
    if strategy.is_main:
        output_dir = training.output_dir
        target = adapters.save_trained(strategy.unwrap(model), state, output_dir, method)
        if method != "full":
            adapters.verify_adapter(target, len(training.trainable), sum(count for _, count in training.trainable))
        training.tokenizer.save_pretrained(target)
        training.tokenizer.save_pretrained(output_dir)
        metadata = {"base_model": config.model.name, "method": method, "objective": config.objective.name,
                    "template": config.data.template,
                    "templates_used": training.data.report.templates, "strategy": strategy.name,
                    "workers": strategy.world_size}
        (target / RUN_METADATA).write_text(json.dumps(metadata, indent=2))
        tracker.log_artifacts([target, output_dir / "config.yaml"])
    strategy.barrier()
