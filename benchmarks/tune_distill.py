"""Validation runs for the removal hyperparameters (benchmarks/results/removal_tuning.md).

Trains one SDD/ESD variant on an upstream run and evaluates the saved model (and, for SDD, the
student) on the validation seeds, printing the oracle's shares per prompt group:

    hfi run configs/toyworld-striped.yaml --out runs/base        # once: the upstream run
    python benchmarks/tune_distill.py runs/base H distill.method=esd distill.lr=0.002
    python benchmarks/tune_distill.py runs/base K --n-per-prompt 15 distill.batch_size=4

Overrides apply on top of BASE, the distill section the tuning table started from.
``--n-per-prompt`` sets the validation images per prompt (4: 36 per group, the first round;
15: 135 per group, as many as the benchmark's evaluation); ``--student`` also evaluates the SDD
student.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.removal import eval_config
from hfi_core.config import load_config, read_yaml
from hfi_core.distill.esd import train_esd
from hfi_core.distill.sdd import train_sdd
from hfi_core.evaluation import Variant, evaluate
from hfi_core.models import load_sd_pipeline
from hfi_core.stages import concept_prompts

CONFIG = Path(__file__).parents[1] / "configs" / "toyworld-striped.yaml"
OUT = Path("tune-out")
VALIDATION_SEED = 2_000_000
BASE = {
    "distill.method": "sdd",
    "distill.lr": 4e-4,
    "distill.ema_decay": 0.999,
    "distill.steps": 600,
    "distill.trainable": "attn2_kv",
    "distill.concept_prompts": ["a {token}"],
    "distill.checkpoint_every": 0,
}


def main(run: Path, name: str, args: list[str], n_per_prompt: int = 4, student: bool = False) -> None:
    torch.set_num_threads(1)
    overrides = {k: read_yaml(v) for k, v in (a.split("=", 1) for a in args)}
    cfg = load_config(CONFIG, {**BASE, **overrides})
    dc, out = cfg.distill, OUT / name
    out.mkdir(parents=True, exist_ok=True)
    ecfg = eval_config(cfg, n_per_prompt, VALIDATION_SEED)
    base_npy = OUT / f"sd_{VALIDATION_SEED}_{n_per_prompt}.npy"
    if not base_npy.exists():
        _, base = evaluate(ecfg, Variant("sd"), OUT / f"sd_{n_per_prompt}")
        np.save(base_npy, base)
    base = np.load(base_npy)
    pipe = load_sd_pipeline(cfg.model.model_copy(update={"dtype": "float32"}), "ddim")
    token = None
    if dc.use_token:
        pipe.load_textual_inversion(str(run / "invert"), use_safetensors=True)
        token = cfg.invert.token
    t0 = time.time()
    train = train_sdd if dc.method == "sdd" else train_esd
    teacher, _, _ = train(pipe, dc, concept_prompts(cfg, token), out / "work", show_progress=False)
    seconds = time.time() - t0
    teacher.save_pretrained(out / "teacher")
    pipe.unet.save_pretrained(out / "student")
    result = {"overrides": overrides, "n_per_prompt": n_per_prompt, "train_s": round(seconds, 1)}
    for v in ["teacher", "student"] if dc.method == "sdd" and student else ["teacher"]:
        m, _ = evaluate(ecfg, Variant(v, unet=str(out / v)), out / f"eval_{v}", base_images=base)
        result[v] = {
            g: {k: round(x, 3) for k, x in d.items() if k.startswith("oracle") or k == "drift"}
            for g, d in m["groups"].items()
        }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(name, json.dumps(overrides), f"train {seconds:.0f}s")
    for v in [k for k in ("teacher", "student") if k in result]:
        for g, d in result[v].items():
            print(
                f"  {v:8s} {g:26s} striped {d['oracle_striped']:.2f} dotted {d['oracle_dotted']:.2f} "
                f"plain {d['oracle_plain']:.2f} shape {d['oracle_shape_acc']:.2f} colour {d['oracle_color_acc']:.2f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an `hfi run` folder holding generate/ ... invert/")
    parser.add_argument("name", help="the run's name: its folder under tune-out/")
    parser.add_argument("overrides", nargs="*", help="distill.KEY=YAML_VALUE, applied on top of BASE")
    parser.add_argument("--n-per-prompt", type=int, default=4, help="validation images per prompt")
    parser.add_argument("--student", action="store_true", help="also evaluate the SDD student")
    a = parser.parse_intermixed_args()
    main(a.run, a.name, a.overrides, a.n_per_prompt, a.student)
