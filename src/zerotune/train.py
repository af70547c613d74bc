"""THE training loop. Every engine and launcher ends up here; the loop never names a strategy.

Loss normalisation: each optimizer step's loss is the sum of per-token cross-entropy over every label token
of the global batch (all micro-batches on all ranks), divided by the number of those tokens. Each micro-batch
backpropagates ``loss_sum * world_size / global_tokens``; the engines average gradients over ranks, which
turns that back into the global token mean. So 1x8, 2x4 and 4x2 splits give the same update.
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
import torch.nn.functional as F

from zerotune import adapters, speed
from zerotune.checkpoints import check_engine_matches, newest_checkpoint, read_trainer_state, restore_rng, \
    save_checkpoint, verified_restore
from zerotune.config import RunConfig, compile_enabled, dump_yaml
from zerotune.data.batches import BatchPlan, collate, eval_batches
from zerotune.data.encode import IGNORE_INDEX
from zerotune.data.prepare import prepare_data
from zerotune.errors import ConfigError, ZerotuneError
from zerotune.model import compute_precision, load_tokenizer, resolve_attention, resolve_dtype
from zerotune.resolve import Machine, choose_strategy, explain_strategy
from zerotune.run_dir import prepare_output_dir  # noqa: F401 - its home is run_dir; callers import it here
from zerotune.speed.chunked_loss import ALL_ROWS
from zerotune.speed.plain_causal import is_plain_causal, plain_causal
from zerotune.speed.step_graphs import StepGraphs, step_plain, wanted
from zerotune.step_io import HostCopy, LaunchedStep, WorkDone, host_values, to_device, without_full_mask
from zerotune.stopping import StopSignals
from zerotune.strategies import create_strategy
from zerotune.strategies.process_group import join_process_group, leave_process_group
from zerotune.tracking import NullTracker, Tracker

RUN_METADATA = "zerotune.json"


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


class NonFiniteError(ZerotuneError):
    """A NaN or Inf loss or gradient norm."""


class RunSession:
    """What a launcher tells the loop: where to resume from, and whom to tell about a new checkpoint.
    Here: --resume, or a restart by torch elastic (--max-restarts), continues from the newest checkpoint."""

    def restore_from(self, config: RunConfig, output_dir: Path) -> Path | None:
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        return newest_checkpoint(output_dir) if config.checkpoint.resume or restarted else None

    def checkpoint_saved(self, step: int, path: Path, metrics: dict, is_main: bool) -> None:
        pass


def learning_rate_factor(config: RunConfig, total_steps: int):
    """Linear warmup, then cosine, linear or constant; a multiplier of the peak lr per step."""
    warmup = config.train.warmup_steps
    schedule = config.train.schedule

    def factor(step: int) -> float:
        if step < warmup:  # step / warmup, as transformers and DeepSpeed's WarmupLR do
            return step / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def token_loss_sum(model, batch: dict[str, torch.Tensor], head=None,
                   label_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over label tokens, and the number of those tokens. Packed batches go in
    with position ids and no attention mask (and never a KV cache), so attention stays inside each example.
    With ``head`` (a zerotune.speed.chunked_loss.ChunkedLossHead) the output head returns the loss sum itself,
    chunked; ``label_count`` (count_label_tokens of the batch, taken on the host) lets it skip a host-GPU sync."""
    if "position_ids" in batch:
        inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    else:
        # A batch without padding may come without its mask (see without_full_mask): plain causal attention.
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    labels = batch["labels"][:, 1:]
    tokens = (labels != IGNORE_INDEX).sum()
    if head is not None:
        with head.computing(batch["labels"], label_count):
            return model(**inputs).logits, tokens
    logits = model(**inputs).logits[:, :-1].float()
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, tokens


def forward_precision(strategy, config: RunConfig, model, graphs: bool = False):
    """The context each forward runs in: none where the engine keeps its own precision (DeepSpeed turns an outer
    autocast off around its model, and warns), else compute_precision's (autocast when the weights are 16-bit)."""
    if strategy.own_precision:
        return contextlib.nullcontext
    return compute_precision(config.model, model, strategy.device, cache=not graphs)


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def run(config: RunConfig, show_progress: bool = True, session: RunSession | None = None) -> RunResult:
    """Train with ``config`` in this process, which is one worker of possibly many."""
    place = join_process_group(config.distributed.use_cpu, need_group=choose_strategy(config, 1) not in ("single",))
    strategy_name, strategy_reason = explain_strategy(config, place.world_size, Machine.of(place.device))
    strategy = create_strategy(strategy_name, config, place.device, place.rank, place.world_size)
    output_dir = Path(config.output.dir)
    try:
        with StopSignals() as signals:
            return _train(config, strategy, output_dir, show_progress, session or RunSession(), signals,
                          strategy_reason)
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


def _train(config: RunConfig, strategy, output_dir: Path, show_progress: bool, session: RunSession,
           signals: StopSignals, strategy_reason: str = "") -> RunResult:
    seed = config.train.seed
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(config.model)
    # Each worker tokenizes its own slice of the records; the engine's all-gather assembles the whole set.
    data = prepare_data(config.data, tokenizer, seed, strategy.rank, strategy.world_size, strategy.all_gather_object)
    plan = BatchPlan(len(data.train), config.train.batch_size, config.train.grad_accum, strategy.world_size, seed)
    plan.check(config.data.path)
    if config.train.max_steps:
        total_steps = config.train.max_steps
    else:
        total_steps = max(1, math.ceil(config.train.epochs * plan.steps_per_epoch))

    # Every rank reads its share of the checksums; all ranks agree on the newest intact checkpoint.
    restore = verified_restore(session.restore_from(config, output_dir), output_dir, strategy)
    state = read_trainer_state(restore) if restore else {}
    if restore:
        check_engine_matches(state, restore, strategy, len(data.train))
    start_step = state.get("step", 0)

    # A fresh start keeps nothing a failed earlier attempt (a restart without a checkpoint) logged.
    tracker = Tracker(config, output_dir, show_progress, resume_step=start_step if restore else -1,
                      resume_run_id=state.get("mlflow_run_id")) if strategy.is_main else NullTracker()
    if strategy.is_main:
        (output_dir / "config.yaml").write_text(dump_yaml(config))
        source = config.data.path or "the bundled English+Spanish sample (no --data given)"
        tracker.note(f"data {source}: {data.report.summary()}; {len(data.train)} train / {len(data.eval)} eval"
                     + (f"; {data.packing.summary()}" if data.packing else ""))
        if config.distributed.strategy == "auto":
            tracker.note(f"--strategy auto: {strategy_reason}")
        tracker.note(
            f"engine {strategy.name}, {strategy.world_size} worker(s) on {strategy.device.type}; global batch "
            f"{plan.global_batch_size} = batch_size {plan.micro_batch_size} x grad_accum {plan.grad_accum} "
            f"x workers {plan.world_size}; {total_steps} steps"
        )

    compiled = compile_enabled(config.model, strategy.device.type, strategy.name, zero3=strategy.gathers_per_module)
    fixed_shapes = config.data.packing or all(len(e.input_ids) == config.data.max_seq_len for e in data.train)
    # Before the model loads: --cuda-graph on stops here when a need is missing (auto may pick flash-attn).
    graphs, graphs_reason = wanted(config.train.cuda_graph, device_type=strategy.device.type, strategy=strategy.name,
                                   compiled=compiled, method=config.adapter.method, fixed_shapes=fixed_shapes,
                                   attention=resolve_attention(config.model.attn_implementation, strategy.device.type))
    if strategy.device.type == "cuda":
        tracker.note(graphs_reason)
    dtype = resolve_dtype(config.model.dtype, strategy.device.type)
    model = strategy.load_base_model(dtype, total_steps)
    model = adapters.apply_method(model, config.adapter, seed)
    # chunked loss, fused projections, the step graphs' attention hint, compiled 4-bit matmuls and layers: one
    # call, in the order speed.install documents (it says, one line each, what it left out and why)
    speedups = speed.install(model, config, strategy, compiled=compiled, graphs=graphs,
                             precision=forward_precision(strategy, config, model))
    for note in speedups.notes:
        tracker.note(note)
    loss_head, graphs = speedups.loss_head, speedups.graphs
    precision = forward_precision(strategy, config, model, graphs)
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]

    def build_optimizer(params):
        # Fused (CUDA and CPU): one kernel per step, and it can drop a non-finite step on the device (found_inf).
        # Replayed steps read the learning rate from a device tensor the scheduler fills in place.
        lr = torch.tensor(config.train.lr, device=strategy.device) if graphs else config.train.lr
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.train.weight_decay,
                                 betas=(0.9, 0.999), eps=1e-8, fused=True, capturable=graphs)

    def build_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(config, total_steps))

    model = strategy.wrap(model, build_optimizer, build_scheduler, total_steps)
    model.train()
    if strategy.device.type == "cuda":  # what the model, its shards and the optimizer hold before any step
        tracker.note(f"GPU memory after setup: {torch.cuda.memory_allocated(strategy.device) / 2**30:.2f} GiB "
                     f"on worker {strategy.rank}")
    result = RunResult(output_dir=output_dir, strategy=strategy.name, mlflow_run_id=tracker.run_id,
                       losses=list(state.get("losses", [])), eval_losses=list(state.get("eval_losses", [])),
                       skipped_steps=state.get("skipped_steps", 0), resumed_from=start_step if restore else None)
    if restore:
        strategy.load_state(model, restore)
        exact = restore_rng(restore, strategy.rank, strategy.device)
        tracker.note(f"resumed from {restore} at step {start_step}"
                     + ("" if exact else f" (RNG states reseeded: it was written by {state['world_size']} workers)"))
        if not exact:
            torch.manual_seed(seed * 7919 + start_step * 31 + strategy.rank)
    tracker.start(total_steps, initial_step=start_step)
    if data.eval and config.train.eval_every and not restore:
        # A step-0 evaluation shows where the base model starts.
        eval_loss = evaluate(model, strategy, data.eval, config.train.batch_size, tokenizer.pad_token_id, loss_head,
                             precision)
        result.eval_losses.append(eval_loss)
        tracker.log(0, {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})

    # Compiled layers with packed rows: one row length for every step, so nothing recompiles (rows are nearly
    # full anyway). Unpacked batches vary in length; torch.compile then switches to dynamic shapes.
    # A replayed CUDA graph needs that too, packed or not.
    pad_to = config.data.max_seq_len if (compiled and config.data.packing) or graphs else None
    strategy.schedule_in_step = not graphs
    save_every, save_seconds = config.checkpoint.save_steps, config.checkpoint.save_minutes * 60
    last_save = time.monotonic()
    elapsed_before = state.get("elapsed_seconds", 0.0)
    run_started = time.monotonic()
    # The host reads a step's loss and grad norm back while the GPU runs the next step (engines that drop a bad
    # step on the device), so it never stalls the GPU queue. A step is timed from the end of the previous
    # step's work to the end of its own: wall time, idle gaps and batching on the CPU included.
    pending: list[LaunchedStep] = []
    previous_done = [WorkDone(strategy.device)]
    # Everything built so far (model, compiled graphs, data) lives for the whole run: take it out of the garbage
    # collector's view, so a full collection mid-run scans only what the steps allocate (a long pause otherwise).
    gc.freeze()

    def finish(launched: "LaunchedStep") -> None:
        label_tokens, input_tokens, slots = launched.info.values()[:3]
        loss_sum, grad_norm, applied = launched.outcome.values()
        elapsed, previous_done[0] = launched.done.seconds_since(previous_done[0]), launched.done
        step = launched.step
        loss = loss_sum / max(label_tokens, 1.0)
        if not applied or not math.isfinite(grad_norm):
            result.skipped_steps += 1
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
            if config.train.on_nonfinite == "stop":
                tracker.finish(status="FAILED")
                raise NonFiniteError(f"step {step + 1}: {what}; the update was not kept and no checkpoint holds it. "
                                     "Lower --lr, check the data, or pass --on-nonfinite skip")
            tracker.note(f"step {step + 1}: {what}; step skipped ({result.skipped_steps} so far)")
            if result.skipped_steps >= config.train.max_skipped_steps:
                tracker.finish(status="FAILED")
                raise NonFiniteError(f"step {step + 1}: {result.skipped_steps} steps had a non-finite loss or "
                                     f"gradient (train.max_skipped_steps {config.train.max_skipped_steps}); "
                                     "lower --lr or check the data")
        result.losses.append(loss)
        if (step + 1) % config.train.log_every == 0 or step + 1 == total_steps:
            tracker.log(step + 1, {
                "loss": loss, "lr": launched.lr, "grad_norm": grad_norm, "epoch": step / plan.steps_per_epoch,
                "tokens_per_second": input_tokens / elapsed, "step_seconds": elapsed, "label_tokens": label_tokens,
                "skipped_steps": result.skipped_steps, "real_token_fraction": input_tokens / slots,
                **memory_metrics(strategy.device),
            })

    def finish_all() -> None:
        while pending:
            finish(pending.pop(0))

    def run_step(device_batches, global_tokens, counts=None, plain=None) -> torch.Tensor:
        """One optimizer step on batches already on the device: [loss sum, grad norm, applied]. With CUDA
        graphs (counts None) nothing here reads a device value on the host, and the loss runs over every row."""
        step_loss_sum = torch.zeros((), device=strategy.device)
        for index, batch in enumerate(device_batches):
            with strategy.accumulating(model, sync=index == len(device_batches) - 1):
                with precision(), plain_causal(plain[index]):
                    loss_sum, _ = token_loss_sum(model, batch, loss_head, ALL_ROWS if counts is None else counts[index])
                strategy.backward(loss_sum * strategy.world_size / global_tokens.clamp(min=1))
            step_loss_sum += loss_sum.detach()
        loss_total = strategy.all_reduce_sum(step_loss_sum)
        grad_norm, applied = strategy.optimizer_step(model, loss_total)
        return torch.stack([loss_total.float(), grad_norm.to(loss_total.device).float(),
                            applied.to(loss_total.device).float()])

    step_graphs = None
    if graphs:
        step_graphs = StepGraphs(lambda batches, tokens, plain: run_step(batches, tokens, None, plain),
                                 note=tracker.note)

    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        micro_indices = plan.micro_batches(epoch, step_in_epoch, strategy.rank)
        batches = [collate([data.train[i] for i in indices], tokenizer.pad_token_id, pad_to) for indices in micro_indices]
        counts = [count_label_tokens(b) for b in batches]  # on the host, before the batches move
        # One all-reduce, before the forward, carries the label-token count the loss is divided by, the input
        # tokens and slots for the metrics, and two agreements: a stop signal on any rank, and rank 0's clock
        # saying a time-based checkpoint is due. Everything in it is known on the host already.
        time_due = bool(save_seconds) and strategy.is_main and time.monotonic() - last_save >= save_seconds
        info = strategy.all_reduce_sum(host_values(strategy.device, [
            sum(counts), sum(int(b["attention_mask"].sum()) for b in batches), sum(b["input_ids"].numel() for b in batches),
            signals.requested is not None, time_due]))
        # Its copy back is queued now, ahead of this step's work: queued after it, reading the stop signal below
        # would wait for the whole step, and the GPU would idle while the host batches the next one.
        info_copy = HostCopy(info)
        batches = [without_full_mask(batch) for batch in batches]
        # the hint exists with graphs only; one flag per step (step_graphs.step_plain)
        plain = step_plain([is_plain_causal(batch) for batch in batches]) if graphs else [False] * len(batches)
        device_batches = [to_device(batch, strategy.device) for batch in batches]
        lr = strategy.current_lr()
        if graphs:
            outcome = step_graphs(device_batches, info[0].float(), plain)
            strategy.scheduler.step()  # fills the learning-rate tensor the next replay reads
        else:
            outcome = run_step(device_batches, info[0].float(), counts, plain)
        if compiled and step == start_step:  # the first step has traced the compiled layers
            broken = speedups.new_graph_breaks()
            if broken:
                tracker.note(broken)
        launched = LaunchedStep(step, lr, info_copy, HostCopy(outcome), WorkDone(strategy.device))
        pending.append(launched)
        while len(pending) > (1 if strategy.drops_steps_on_device else 0):
            finish(pending.pop(0))
        stop_votes, time_votes = launched.info.values()[3:]
        last = step + 1 == total_steps
        stop = stop_votes > 0 and not last
        evaluate_now = data.eval and (last or (config.train.eval_every and (step + 1) % config.train.eval_every == 0))
        save_now = stop or (save_every and (step + 1) % save_every == 0) or time_votes > 0
        if last or evaluate_now or save_now:
            finish_all()  # this step's loss is known (and its update checked) before anything is written
        if evaluate_now:
            eval_loss = evaluate(model, strategy, data.eval, config.train.batch_size, tokenizer.pad_token_id,
                                 loss_head, precision)
            result.eval_losses.append(eval_loss)
            tracker.log(step + 1, {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})
        if save_now:
            trainer_state = {
                "step": step + 1, "epoch": (step + 1) // plan.steps_per_epoch,
                "step_in_epoch": (step + 1) % plan.steps_per_epoch,
                "examples_seen": (step + 1) * plan.global_batch_size, "global_batch_size": plan.global_batch_size,
                "train_examples": len(data.train), "world_size": strategy.world_size, "strategy": strategy.name,
                "format": strategy.checkpoint_format, "losses": result.losses, "eval_losses": result.eval_losses,
                "skipped_steps": result.skipped_steps, "mlflow_run_id": tracker.run_id,
                "elapsed_seconds": elapsed_before + time.monotonic() - run_started,
            }
            result.checkpoint = save_checkpoint(strategy, model, output_dir, step + 1, trainer_state,
                                                config.checkpoint.keep)
            last_save = time.monotonic()
            session.checkpoint_saved(step + 1, result.checkpoint, {"loss": result.losses[-1], "step": step + 1},
                                     strategy.is_main)
        if evaluate_now or save_now:
            previous_done[0] = WorkDone(strategy.device)  # the next step's time leaves out evaluation and saving
        if stop:
            tracker.note(f"stopped by {signals.requested or 'a signal on another worker'} after step {step + 1}; "
                         f"checkpoint {result.checkpoint}. Continue with the same command plus --resume")
            tracker.finish(status="KILLED")
            result.preempted = True
            return result

    save_outputs(config, strategy, model, tokenizer, output_dir, data.report.templates, trainable, tracker)
    tracker.finish()
    return result


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


@torch.no_grad()
def evaluate(model, strategy, examples, batch_size: int, pad_token_id: int, head=None, precision=None) -> float:
    """Token-weighted mean loss over every eval example, across all ranks."""
    model.eval()
    totals = torch.zeros(2, device=strategy.device)
    for indices in eval_batches(len(examples), batch_size, strategy.rank, strategy.world_size):
        batch = to_device(collate([examples[i] for i in indices], pad_token_id), strategy.device)
        with (precision or contextlib.nullcontext)():
            loss_sum, tokens = token_loss_sum(model, batch, head)
        totals += torch.stack([loss_sum, tokens.float()])
    totals = strategy.all_reduce_sum(totals)
    model.train()
    return float(totals[0] / totals[1].clamp(min=1))


def save_outputs(config, strategy, model, tokenizer, output_dir, templates, trainable, tracker) -> None:
    """Gather what must be saved (only the adapter for LoRA), write it on rank 0, verify it."""
    method = config.adapter.method
    state = strategy.full_state_dict(model) if method == "full" else strategy.trainable_state_dict(model)
    if strategy.is_main:
        inner = strategy.unwrap(model)
        target = adapters.save_trained(inner, state, output_dir, method)
        if method != "full":
            adapters.verify_adapter(target, len(trainable), sum(count for _, count in trainable))
        tokenizer.save_pretrained(target)
        tokenizer.save_pretrained(output_dir)
        metadata = {"base_model": config.model.name, "method": method, "template": config.data.template,
                    "templates_used": templates, "strategy": strategy.name, "workers": strategy.world_size}
        (target / RUN_METADATA).write_text(json.dumps(metadata, indent=2))
        tracker.log_artifacts([target, output_dir / "config.yaml"])
    strategy.barrier()
