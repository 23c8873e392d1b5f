"""launch/client.py with a step hook installed, for the tests that kill a client mid-round.

Started exactly as launch/client.py (deepspeed, torchrun or python; the same arguments). The hook,
set up from the environment:

    FEDZERO_TEST_CRASH_AFTER_STEP=j   every rank exits with status 17 right after optimizer step j of
                                      a round (after that step's checkpoint, if one is due)
    FEDZERO_TEST_STEP_LOG=FILE        rank 0 appends one JSON line per step: the round, the steps done,
                                      and the step of the round's complete checkpoint at that moment
"""

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

CRASH_ENV = "FEDZERO_TEST_CRASH_AFTER_STEP"
STEP_LOG_ENV = "FEDZERO_TEST_STEP_LOG"
CRASH_EXIT_CODE = 17
REPO = Path(__file__).resolve().parent.parent


def load_launcher():
    """launch/client.py as a module (launch/ is not a package)."""
    spec = importlib.util.spec_from_file_location("fedzero_launch_client", REPO / "launch" / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_hook(state_dir: Path, environ=os.environ):
    import torch

    from fedzero.client.state import read_checkpoint_info

    crash_after = int(environ.get(CRASH_ENV, "0") or 0)
    step_log = environ.get(STEP_LOG_ENV)

    def after_step(rnd: int, done: int) -> None:
        if step_log and torch.distributed.get_rank() == 0:
            info = read_checkpoint_info(state_dir, rnd)
            with open(step_log, "a") as f:
                f.write(json.dumps({"round": rnd, "step": done, "checkpoint": info and info["step"]}) + "\n")
        if crash_after and done == crash_after:
            torch.distributed.barrier()     # every rank has finished the step (and its checkpoint)
            logging.getLogger("fedzero.client").error("%s=%d: exiting after step %d of round %d",
                                                      CRASH_ENV, crash_after, done, rnd)
            os._exit(CRASH_EXIT_CODE)

    return after_step


if __name__ == "__main__":
    from fedzero.client.client_config import load_client_config

    launcher = load_launcher()
    state_dir = load_client_config(launcher.parse_args().config).state_dir
    sys.exit(launcher.main(after_step=make_hook(state_dir)))
