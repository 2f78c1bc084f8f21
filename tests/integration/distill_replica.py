"""One process of a data-parallel SDD run on the committed toy world (a launcher starts N of
these; ``python distill_replica.py OUT`` alone is the one-process reference).

Writes ``OUT/rank<r>.json``: the per-step losses, how many trajectories this process rolled out,
and a checksum of its EMA teacher; process 0 also saves the teacher with ``save_pretrained``."""

import hashlib
import json
import sys
from pathlib import Path

import torch

import hfi_core.distill.common as common
from hfi_core.config import DistillConfig, ModelConfig
from hfi_core.distill.sdd import train_sdd
from hfi_core.models import load_sd_pipeline


def main(out: Path) -> None:
    from accelerate import PartialState

    from tasks.common import join_process_group

    join_process_group()  # as every hfi command does: the launcher's group, through accelerate
    state = PartialState(cpu=not torch.cuda.is_available())
    torch.set_num_threads(1)
    rolled = []
    states = common.trajectory_states

    def counting(unet, sched, cond, uncond, positions, guidance, shape, generator):
        rolled.append(shape[0])  # trajectories of this rollout (this process's share)
        return states(unet, sched, cond, uncond, positions, guidance, shape, generator)

    common.trajectory_states = counting  # counted, then run as is
    pipe = load_sd_pipeline(ModelConfig(path="toyworld:sd", dtype="float32", device="cpu"), "ddim")
    cfg = DistillConfig(steps=24, batch_size=4, sampler_steps=8, lr=5e-4, ema_decay=0.9, checkpoint_every=0)
    teacher, names, losses = train_sdd(pipe, cfg, ["a red circle in the style of van stripe"], out / "work",
                                       show_progress=False)  # fmt: skip
    digest = hashlib.sha256(b"".join(teacher.state_dict()[n].numpy().tobytes() for n in names)).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(
        {"world": state.num_processes, "losses": losses, "trajectories": sum(rolled), "teacher": digest}))  # fmt: skip
    if state.process_index == 0:
        teacher.save_pretrained(out / "teacher")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
