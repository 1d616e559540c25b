"""Several JAX processes on one machine, joined by `jax.distributed` over loopback: the multi-host
path, testable on one box. On real hosts, run the same command on each with its own process id and
the first host's address as coordinator.

    python -m jaxchunk.launch -n 2 --devices-per-process 2 -- python my_script.py ARGS

starts N copies of the command with JAXCHUNK_COORDINATOR=127.0.0.1:PORT, JAXCHUNK_NUM_PROCESSES=N,
JAXCHUNK_PROCESS_ID=i (and, on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=K), waits for
all of them (a timeout or one failing ends the others), prefixes their output with "[i]" and exits
with the first non-zero status. The script calls `initialize()` before anything else touches JAX;
afterwards `jax.devices()` spans every process and `jaxchunk.sharding.make_mesh` builds a mesh over
them (data-major: with the default device order the data axis runs across processes).

jaxchunk's own host reads (cache lengths, generated ids) go through `jaxchunk.sharding.to_host`,
which gathers an array split across processes; every process runs the same loop.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

ENV_COORDINATOR, ENV_NUM, ENV_ID = "JAXCHUNK_COORDINATOR", "JAXCHUNK_NUM_PROCESSES", "JAXCHUNK_PROCESS_ID"


def initialize() -> bool:
    """`jax.distributed.initialize` from the launcher's environment (CPU collectives over gloo).
    Returns False (and does nothing) outside a launch."""
    if ENV_COORDINATOR not in os.environ:
        return False
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ[ENV_COORDINATOR],
                               num_processes=int(os.environ[ENV_NUM]), process_id=int(os.environ[ENV_ID]))
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay(i: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{i}] {line}")
        out.flush()


def launch(command: list[str], num_processes: int, *, devices_per_process: int = 1, port: int | None = None,
           timeout: float = 600.0) -> int:
    """Run `command` as `num_processes` processes joined over 127.0.0.1; the first non-zero exit
    status (124 on timeout), 0 when all succeed. Every process is ended before this returns."""
    port = free_port() if port is None else port
    procs, relays = [], []
    for i in range(num_processes):
        env = dict(os.environ, **{ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM: str(num_processes),
                                  ENV_ID: str(i)})
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        relay = threading.Thread(target=_relay, args=(i, proc.stdout, sys.stdout), daemon=True)
        relay.start()
        relays.append(relay)
    deadline = time.monotonic() + timeout
    status = 0
    try:
        while None in [p.poll() for p in procs]:  # poll every one: a failure anywhere ends the rest
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                status = failed[0] if failed else 124
                break
            time.sleep(0.1)
        else:
            status = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for r in relays:
            r.join(timeout=5)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxchunk.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1, help="forced CPU devices per process")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before every process is ended")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.num_processes < 1:
        parser.error("give -n N >= 1 and a command after --")
    return launch(command, args.num_processes, devices_per_process=args.devices_per_process, port=args.port,
                  timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
