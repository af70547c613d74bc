"""Run training in-process the way the CLI does; watch a run's listening sockets."""

import ipaddress
import json
import threading
import time
from pathlib import Path

from safetensors.torch import load_file

from zerotune.launchers import launch
from zerotune.run_dir import prepare_output_dir


def train(config):
    prepare_output_dir(Path(config.output.dir), overwrite=False, resume=config.checkpoint.resume)
    return launch(config, show_progress=False)


def adapter_weights(output_dir) -> dict:
    return load_file(str(Path(output_dir) / "adapter" / "adapter_model.safetensors"))


def dropout_gradient_check(model, ids, eps: float = 1e-5) -> tuple[float, float]:
    """For a model whose forward draws random numbers (dropout) from the global generator: the gradient of
    the next-token loss along a random direction of the trainable weights, against central differences of
    forwards that draw the same numbers (the seed set before each). They agree when the backward used the
    forward's draws, e.g. a checkpoint's recomputation the forward's masks. Returns (gradient, difference)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        torch.manual_seed(7)
        logits = model(input_ids=ids).logits  # the loss in the logits' dtype (the model's own upcasts to fp32)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    generator = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    loss().backward()
    along = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()

    def shifted(step):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)
        value = loss().item()
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(step * d)
        return value

    return along, (shifted(eps) - shifted(-eps)) / (2 * eps)


def dropout_model(model_dir, device="cpu"):
    """A tiny Llama in fp64 with checkpointing, LoRA dropout 0.3 and random (nonzero) adapter weights, so
    the masks reach the loss and its gradient."""
    import torch

    from zerotune import adapters
    from zerotune.config import AdapterConfig, ModelConfig
    from zerotune.model import load_model

    model = load_model(ModelConfig(name=str(model_dir), gradient_checkpointing=True), "lora",
                       torch.device(device), torch.float64)
    return random_adapters(adapters.apply_method(model, AdapterConfig(dropout=0.3), seed=0))


def random_adapters(model, scale: float = 0.1):
    """Every trainable weight drawn at random (seeded), LoRA B included, so the updates reach the outputs (PEFT
    starts B at zero). Returns the model in training mode."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return model.train()


def op_counting_compile(graphs: list):
    """As matmul_counting_compile, appending ("fw" | "bw", {op: count}) for aten.mm and zerotune's custom ops."""
    import collections

    def count(graph):
        names = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
        return dict(collections.Counter(n.split(".")[1] for n in names
                                        if n == "aten.mm.default" or n.startswith("zerotune.")))
    return _counting_compile(graphs, count)


def matmul_counting_compile(counts: list):
    """A stand-in for ``Module.compile`` whose backend appends ("fw" | "bw", matmul count) for each graph
    AOTAutograd compiles, partitioned as inductor does (min-cut, with its common-subexpression elimination),
    and runs the graph as traced (fast on CPU). Install with monkeypatch.setattr(torch.nn.Module, "compile", ...)."""
    import torch

    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
    return _counting_compile(counts, lambda graph: sum(node.target in matmuls for node in graph.graph.nodes))


def _counting_compile(results: list, count):
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def counter(kind):
        def compiler(graph, example_inputs):
            results.append((kind, count(graph)))
            return graph.forward
        return compiler

    backend = aot_autograd(fw_compiler=counter("fw"), bw_compiler=counter("bw"),
                           partition_fn=min_cut_rematerialization_partition)
    original = torch.nn.Module.compile

    def compile(self, *args, **kwargs):
        kwargs.pop("mode", None)
        kwargs.pop("options", None)  # inductor's (LAYER_COMPILE_OPTIONS); this backend runs the graph as traced
        return original(self, *args, backend=backend, **kwargs)
    return compile


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


class ListeningSockets:
    """Polls, from a thread, the listening TCP sockets of a process tree (and of Ray's session) until stopped."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.seen: dict[tuple[int, str, int], str] = {}  # (pid, ip, port) -> the owner's command line
        self.session_dirs: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _processes(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        for process in processes:
            self._note_session(process)
        if self.session_dirs:  # Ray processes that are no descendants (re-parented) still name the session
            for process in psutil.process_iter(["cmdline"]):
                command = " ".join(process.info["cmdline"] or [])
                if any(session in command for session in self.session_dirs):
                    processes.append(process)
        return processes

    def _note_session(self, process) -> None:
        import psutil

        try:
            for argument in process.cmdline():
                for flag in ("--session-dir=", "--session_dir="):
                    if argument.startswith(flag):
                        self.session_dirs.add(argument[len(flag):])
        except psutil.Error:
            pass

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            for process in self._processes():
                try:
                    connections = process.net_connections(kind="tcp")
                    command = " ".join(process.cmdline()) or process.name()
                except psutil.Error:
                    continue
                for connection in connections:
                    if connection.status == psutil.CONN_LISTEN:
                        self.seen.setdefault((process.pid, connection.laddr.ip, connection.laddr.port), command)
            time.sleep(0.2)

    def exposed(self) -> list[str]:
        return [f"{ip}:{port} (pid {pid}: {command[:120]})" for (pid, ip, port), command in sorted(self.seen.items())
                if not is_loopback(ip)]

    def owners(self) -> list[str]:
        return list(self.seen.values())


def losses_of(out: Path) -> list[float]:
    """The training losses a run directory's metrics.jsonl holds, in order."""
    events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [event["loss"] for event in events if "loss" in event]


def wait_for(predicate, process, timeout=120.0):
    """Poll ``predicate`` while ``process`` runs; fail if it ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"run ended early: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def preempt_after_three_steps(process, out: Path, steps: int) -> str:
    """SIGTERM to a `zerotune train` process once it has logged 3 steps: it must exit 75 naming --resume, with no
    final adapter and a checkpoint from step 3 on, before step ``steps``. Its stderr."""
    import signal

    from zerotune.checkpoints import newest_checkpoint
    from zerotune.checkpoints.manifest import TRAINER_STATE
    from zerotune.stopping import EXIT_PREEMPTED

    wait_for(lambda: (Path(out) / "metrics.jsonl").is_file() and len(losses_of(out)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, err
    assert "--resume" in err and not (Path(out) / "adapter").exists()
    stopped_at = json.loads((newest_checkpoint(out) / TRAINER_STATE).read_text())["step"]
    assert 3 <= stopped_at < steps
    return err
