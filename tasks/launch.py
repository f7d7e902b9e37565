"""Launch a stage under torchrun with one process per visible GPU, or one on CPU.

`python -m tasks.launch <stage> [options]` is what the DAG runs for distributed stages
in every runtime. Multi-node training sets `CLEAR_NNODES`, `CLEAR_NODE_RANK` and
`CLEAR_RDZV_ENDPOINT` (host:port of the rendezvous, c10d backend); without them the
run is single-node with torchrun's standalone rendezvous. `CLEAR_NPROC_PER_NODE`
overrides the process count.
"""

import os
import sys


def torchrun_command(argv: list[str]) -> list[str]:
    import torch

    processes = os.environ.get("CLEAR_NPROC_PER_NODE") or str(torch.cuda.device_count() or 1)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    nodes = os.environ.get("CLEAR_NNODES", "1")
    if nodes == "1":
        command.append("--standalone")
    else:
        endpoint = os.environ.get("CLEAR_RDZV_ENDPOINT")
        if not endpoint:
            raise SystemExit("error: CLEAR_NNODES is above 1 but CLEAR_RDZV_ENDPOINT is not "
                             "set; set it to host:port of the rendezvous node")
        command += [f"--nnodes={nodes}", f"--node-rank={os.environ.get('CLEAR_NODE_RANK', '0')}",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                    f"--rdzv-id={os.environ.get('CLEAR_RDZV_ID', 'clear')}"]
    # "--" ends torchrun's own options; without it, argparse would read the stage's
    # `--run` as an abbreviation of torchrun's `--run-path`.
    return [*command, "-m", "tasks", "--", *argv]


def main() -> None:
    command = torchrun_command(sys.argv[1:])
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
