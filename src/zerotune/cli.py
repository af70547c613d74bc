"""The ``zerotune`` command: one plain function per subcommand.

Train flags are generated from the typed config (zerotune.config), so flags, YAML keys and
``section.key=value`` overrides share one schema and one set of help texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from zerotune.errors import ZerotuneError
from zerotune.ranges import checked_number

EXIT_USER_ERROR = 2


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from zerotune.config import SECTIONS, field_specs

    groups = {name: parser.add_argument_group(f"{name} ({cls.__doc__.strip()})") for name, cls in SECTIONS.items()}
    for key, spec, annotation in field_specs():
        flag = spec.metadata.get("flag")
        if not flag:
            continue
        section = key.split(".")[0]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        valid = f"; valid: {spec.metadata['valid']}" if spec.metadata.get("valid") else ""
        help_text = f"{spec.metadata['help']} [{key}; default: {default!r}{valid}]".replace("%", "%%")
        if annotation is bool:  # a default-on switch also gets its --no- form
            action = argparse.BooleanOptionalAction if default else "store_true"
            groups[section].add_argument(flag, dest=key, action=action, default=argparse.SUPPRESS, help=help_text)
            continue
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
        groups[section].add_argument(flag, dest=key, default=argparse.SUPPRESS, choices=choices,
                                     metavar=None if choices else key.split(".")[1].upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerotune",
        description="Fine-tune LLMs with LoRA, QLoRA or full training, on one CPU or many GPUs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (_add_train_parser, _add_generate_parser, _add_merge_parser, _add_quickstart_parser,
                       _add_plan_parser, _add_data_parser, _add_bench_parser):
        add_parser(commands)
    return parser


def _add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="fine-tune a model",
        description="Fine-tune a model. Settings come from CONFIG.yaml, then flags, then section.key=value "
                    "overrides (highest precedence). Every flag below is also a YAML key, shown in brackets.",
    )
    train.add_argument("inputs", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]",
                       help="an optional YAML config, then dotted overrides such as train.lr=1e-4")
    _add_config_flags(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--dry-run", action="store_true",
                       help="check the inputs, print how every auto setting resolves on this machine, and exit")


def _add_generate_parser(commands) -> None:
    generate = commands.add_parser("generate", help="generate responses with a base model and an adapter")
    generate.add_argument("--model", required=True, help="base model: hub id or local directory")
    generate.add_argument("--adapter", help="adapter directory written by train (output_dir/adapter)")
    generate.add_argument("--instruction", help="the instruction to answer")
    generate.add_argument("--input", default="", help="optional input / context for the instruction")
    generate.add_argument("--prompts", help="batch mode: .jsonl of {instruction, input} records, or a text file "
                                            "with one instruction a line; prints one JSON line per prompt")
    generate.add_argument("--template", help="alpaca, alpaca_es, chat or auto; default: the one recorded with the "
                                             "adapter, else alpaca")
    generate.add_argument("--max-new-tokens", type=checked_number(int, "[1, inf)", "--max-new-tokens"), default=128,
                          help="most tokens to generate (default 128)")
    generate.add_argument("--temperature", type=checked_number(float, "[0, inf)", "--temperature"), default=0.0,
                          help="sampling temperature; 0 (default) decodes greedily")
    generate.add_argument("--top-p", type=checked_number(float, "(0, 1]", "--top-p"), default=1.0,
                          help="nucleus sampling mass when sampling, in (0, 1]")
    generate.add_argument("--num-beams", type=checked_number(int, "[1, inf)", "--num-beams"), default=1,
                          help="beam search width (1: no beam search)")
    generate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                          help="cpu, cuda or auto (default: cuda when available)")
    generate.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


def _add_merge_parser(commands) -> None:
    merge = commands.add_parser("merge", help="fold a LoRA adapter into its base model and save it")
    merge.add_argument("--model", required=True, help="base model: hub id or local directory")
    merge.add_argument("--adapter", required=True, help="adapter directory written by train")
    merge.add_argument("--output-dir", required=True, help="where to write the merged model (safetensors)")
    merge.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="dtype of the merged weights (default fp32)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def _add_quickstart_parser(commands) -> None:
    quickstart = commands.add_parser(
        "quickstart", help="offline demo: build a tiny model, fine-tune it on bundled EN+ES data, compare outputs")
    quickstart.add_argument("--output-dir", default="quickstart-output", help="where the run goes")
    quickstart.add_argument("--max-steps", type=checked_number(int, "[1, inf)", "--max-steps"), default=None,
                            help="override the example's step count")
    quickstart.add_argument("--tracking", choices=["mlflow", "none"], default=None,
                            help="mlflow (default when installed) or none")


def _add_plan_parser(commands) -> None:
    plan = commands.add_parser(
        "plan", help="predict memory, speed and cost of a training setup before launching it",
        description="Predict per-GPU memory (broken down), tokens/s, wall time and cost for the same config and "
                    "flags as train, list setups that fit (fastest first) and lint known-bad combinations. "
                    "Offline: reads a local config.json or a built-in table of popular architectures.")
    plan.add_argument("inputs", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]",
                      help="an optional YAML config, then dotted overrides, as for train")
    plan.add_argument("--gpu", default="h100", help="GPU model: h100, h200, a100-80g, a100-40g, l40s, l4, a10g, t4, "
                                                    "v100 (default h100)")
    plan.add_argument("--gpus", type=checked_number(int, "[1, inf)", "--gpus"), default=None,
                      help="GPUs per node (default: --num-workers / --nodes)")
    plan.add_argument("--nodes", type=checked_number(int, "[1, inf)", "--nodes"), default=1,
                      help="machines (default 1)")
    plan.add_argument("--price-per-gpu-hour", type=checked_number(float, "[0, inf)", "--price-per-gpu-hour"),
                      default=None, help="price of one GPU-hour, for the cost")
    plan.add_argument("--dataset-tokens", type=checked_number(float, "[1, inf)", "--dataset-tokens"), default=None,
                      help="tokens in one epoch of the data (e.g. 9.9e6); default: counted from --data when given")
    plan.add_argument("--internode-gbps", type=checked_number(float, "(0, inf)", "--internode-gbps"), default=100.0,
                      help="network between nodes, Gbit/s per node (default 100), for FSDP/ZeRO-3 across nodes")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_config_flags(plan)


def _add_data_parser(commands) -> None:
    data = commands.add_parser("data", help="inspect training data before a run")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    preview = data_commands.add_parser(
        "preview", help="show examples exactly as training sees them, with the tokens that carry labels marked",
        description="Prepare the data as train would (same config and flags; only the tokenizer is loaded) and "
                    "print the first examples of the first epoch, the text that carries labels in «...», then "
                    "how many examples were kept, truncated and dropped.")
    preview.add_argument("inputs", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]",
                         help="an optional YAML config, then dotted overrides, as for train")
    preview.add_argument("-n", "--num-examples", type=checked_number(int, "[1, inf)", "--num-examples"), default=3,
                         help="how many examples (packed rows with --packing) to show (default 3)")
    preview.add_argument("--show-ids", action="store_true", help="also print each example's token ids and labels")
    _add_config_flags(preview)


def _add_bench_parser(commands) -> None:
    from zerotune.bench import WORKLOADS

    bench = commands.add_parser(
        "bench", help="time a workload: stock HF+PEFT (or TRL, Liger, Unsloth) and zerotune, same run, same data",
        description="Run a named workload in one run: the baselines (the stock HF+PEFT eager loop unless --baseline "
                    "names others: TRL, Liger, Unsloth, each in a process of its own) and zerotune's own "
                    "training loop, on the same random-weight architecture, data and settings. Prints tokens/s, "
                    "LoRA-MFU, peak memory and the ratio against each, and on NVIDIA GPUs each side's mean power, SM clock and "
                    "joules per step (NVML, GPU 0), with a note when zerotune's steps ran at the power cap; writes "
                    "OUT_DIR/<date>-<gpu>-<workload>.json.",
        epilog="workloads: " + "; ".join(f"{w.name}: {w.description}" for w in WORKLOADS.values()))
    bench.add_argument("workload", choices=list(WORKLOADS), help="which workload (listed below)")
    bench.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="zerotune-side settings, e.g. model.compile=off to time the eager path")
    bench.add_argument("--tiny", action="store_true",
                       help="a tiny model on the CPU in seconds: tests the harness, not the speed")
    bench.add_argument("--steps", type=checked_number(int, "[1, inf)", "--steps"), default=None,
                       help="optimizer steps per side (default 30; tiny 4)")
    bench.add_argument("--warmup-steps", type=checked_number(int, "[0, inf)", "--warmup-steps"), default=None,
                       help="first steps left out of the timing (compilation, allocator warm-up; default 5; tiny 1)")
    bench.add_argument("--out-dir", default="benchmarks/results", help="where the JSON result goes")
    bench.add_argument("--work-dir", default=None, help="scratch space for model, data and runs (default: a "
                                                        "new temporary directory)")
    bench.add_argument("--seed", type=checked_number(int, "[0, 4294967295]", "--seed"), default=0,
                       help="weights, data and LoRA seed (default 0)")
    bench.add_argument("--baseline", type=baseline_names, action="extend", default=None, metavar="NAME[,NAME]",
                       help="baselines to measure against, repeatable or comma-separated: hf (stock HF+PEFT, the "
                            "default), trl, liger, unsloth; the dpo workloads: trl only")
    bench.add_argument("--micro-batch", type=checked_number(int, "[1, inf)", "--micro-batch"), default=None,
                       help="examples (pairs for dpo) per step on every side, instead of the workload's")


def baseline_names(value: str) -> list[str]:
    from zerotune.bench.harness import BASELINES

    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(BASELINES)}")
    return names


def split_train_inputs(inputs: list[str]) -> tuple[str | None, list[str]]:
    config_file, overrides = None, []
    for item in inputs:
        if "=" in item:
            overrides.append(item)
        elif config_file is None and item.endswith((".yaml", ".yml")):
            config_file = item
        else:
            raise ZerotuneError(f"{item!r}: expected a .yaml config file or a section.key=value override")
    return config_file, overrides


def config_from_args(args: argparse.Namespace):
    from zerotune.config import build_config, load_yaml, parse_overrides

    config_file, overrides = split_train_inputs(args.inputs)
    flags = {key: value for key, value in vars(args).items() if "." in key}
    layers = [load_yaml(config_file)] if config_file else []
    return build_config(*layers, flags, parse_overrides(overrides))


def command_train(args: argparse.Namespace):
    from zerotune.launchers import launch, leave_after_preemption
    from zerotune.preflight import preflight
    from zerotune.run_dir import prepare_output_dir

    from zerotune.launchers import absolute_paths, settings_for
    from zerotune.preflight import one_batch_shape

    config = config_from_args(args)
    data = preflight(config)
    # Every "auto" decided once, here, for every worker (zerotune.resolve); the loop logs the table again.
    settings = settings_for(absolute_paths(config), fixed_shapes=lambda: one_batch_shape(config, data))
    if args.dry_run:
        print(settings.table())
        print("dry run: inputs checked, nothing trained or written")
        return 0
    # This process holds the directory's lock while training runs: a second run into it fails at once.
    with prepare_output_dir(Path(config.output.dir), config.output.overwrite, config.checkpoint.resume):
        result = launch(config, show_progress=not args.quiet, settings=settings)
    if result.preempted:
        from zerotune.stopping import EXIT_PREEMPTED

        print(f"zerotune: stopped early; checkpoint {result.checkpoint}. Continue with the same command and "
              f"--resume (exit status {EXIT_PREEMPTED})", file=sys.stderr)
        return leave_after_preemption(config, EXIT_PREEMPTED)  # the local launcher leaves here, with os._exit
    print(f"done: outputs in {config.output.dir}")
    return 0


def command_generate(args: argparse.Namespace) -> None:
    import json

    from zerotune.generate import SamplingOptions, check_pairing, generate, load_for_generation, \
        load_generation_tokenizer, pick_device, read_prompt_file, render_prompt, resolve_template

    if not args.instruction and not args.prompts:
        raise ZerotuneError("generate: pass --instruction TEXT or --prompts FILE")
    records = read_prompt_file(args.prompts) if args.prompts else [{"instruction": args.instruction,
                                                                     "input": args.input}]
    templates = [resolve_template(args.template, args.adapter, record) for record in records]
    device = pick_device(args.device)
    check_pairing(args.model, args.adapter, args.trust_remote_code)
    tokenizer = load_generation_tokenizer(args.model, args.adapter, args.trust_remote_code)
    prompts = [render_prompt(record, template, tokenizer) for record, template in zip(records, templates)]
    model, tokenizer = load_for_generation(args.model, args.adapter, device=device,
                                           trust_remote_code=args.trust_remote_code, tokenizer=tokenizer)
    options = SamplingOptions(args.max_new_tokens, args.temperature, args.top_p, args.num_beams)
    responses = generate(model, tokenizer, prompts, options)
    if args.prompts:
        for record, response in zip(records, responses):
            print(json.dumps({**record, "response": response}, ensure_ascii=False))
    else:
        print(responses[0])


def command_merge(args: argparse.Namespace) -> None:
    from zerotune.merge import merge_to_directory

    merge_to_directory(args.model, args.adapter, Path(args.output_dir), args.dtype, args.overwrite)
    print(f"merged model written to {args.output_dir}")


def command_quickstart(args: argparse.Namespace) -> None:
    from zerotune.quickstart import run_quickstart

    run_quickstart(Path(args.output_dir), max_steps=args.max_steps, tracking=args.tracking)


def command_plan(args: argparse.Namespace) -> None:
    import json

    from zerotune.plan.catalog import find_gpu
    from zerotune.plan.report import count_dataset_tokens, make_plan, render

    config = config_from_args(args)
    gpu = find_gpu(args.gpu)
    gpus = args.gpus if args.gpus is not None else max(1, config.distributed.num_workers // args.nodes)
    tokens, note = (int(args.dataset_tokens), "") if args.dataset_tokens else (None, "")
    if tokens is None and config.data.path:
        tokens, note = count_dataset_tokens(config)
    plan = make_plan(config, gpu, gpus, args.nodes, args.price_per_gpu_hour, tokens, note,
                     internode_gbs=args.internode_gbps / 8)
    settings = planned_settings(config, gpu, gpus, args.nodes)
    plan["settings"] = [vars(decision) for decision in settings.decisions]
    print(json.dumps(plan, indent=1) if args.json else render(plan) + "\nsettings as train would resolve them "
          "on these GPUs:\n" + settings.table())


def planned_settings(config, gpu, gpus_per_node: int, nodes: int):
    """What `zerotune train` would decide for every "auto" (zerotune.resolve) on the planned GPUs."""
    from dataclasses import replace

    from zerotune.preflight import one_batch_shape
    from zerotune.resolve import Machine, resolve

    machine = Machine("cuda", gpu.name.replace("-40g", " 40gb"), int(gpu.memory_gib * 2**30), gpus_per_node, gpu.bf16)

    def fixed_shapes():  # known where the model's tokenizer and the data are local
        try:
            return one_batch_shape(config) if config.data.packing or Path(config.model.name).is_dir() else None
        except ZerotuneError:
            return None

    workers = replace(config.distributed, num_workers=gpus_per_node * nodes)
    return resolve(replace(config, distributed=workers), machine, gpus_per_node * nodes, fixed_shapes)


def command_data(args: argparse.Namespace) -> None:
    from zerotune.data.preview import preview

    print(preview(config_from_args(args), args.num_examples, args.show_ids))


def command_bench(args: argparse.Namespace) -> None:
    from zerotune.bench import WORKLOADS, run_bench
    from zerotune.config import parse_overrides

    command = "zerotune bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [args.workload])
    run_bench(args.workload, tiny=args.tiny, steps=args.steps, warmup=args.warmup_steps, out_dir=args.out_dir,
              work_dir=args.work_dir, seed=args.seed, ours_overrides=parse_overrides(args.overrides),
              command=command, baselines=tuple(args.baseline or WORKLOADS[args.workload].baselines[:1]),
              micro_batch=args.micro_batch)


def with_bare_switches(argv: list[str]) -> list[str]:
    """An auto/on/off flag given alone (``--cuda-graph``, ``--compile``) means ``on``: argparse's optional value
    would swallow a following config file or override, so the ``on`` is written in before parsing."""
    from zerotune.config import field_specs

    switches = {spec.metadata["flag"]: typing.get_args(annotation) for _, spec, annotation in field_specs()
                if spec.metadata.get("flag") and typing.get_origin(annotation) is typing.Literal
                and {"on", "off"} <= set(typing.get_args(annotation))}
    result = []
    for index, item in enumerate(argv):
        result.append(item)
        if item in switches and (index + 1 == len(argv) or argv[index + 1] not in switches[item]):
            result.append("on")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but overrides of train and bench may come after flags (argparse stops at the first flag)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(with_bare_switches(sys.argv[1:] if argv is None else list(argv)))
    takes_more = {"train": "inputs", "plan": "inputs", "bench": "overrides", "data": "inputs"}.get(args.command)
    unknown = [item for item in extra if item.startswith("-") or not takes_more]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see zerotune {args.command} --help)")
    if takes_more:
        setattr(args, takes_more, list(getattr(args, takes_more)) + extra)
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {"train": command_train, "generate": command_generate, "merge": command_merge,
                "quickstart": command_quickstart, "bench": command_bench,
                "plan": command_plan, "data": command_data}
    try:
        args = parse_args(argv)  # a number out of its range fails here, as a ConfigError
        status = handlers[args.command](args)
    except ZerotuneError as error:
        print(f"zerotune: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return status if isinstance(status, int) else 0
