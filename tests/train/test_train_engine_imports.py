"""What building a DeepSpeed engine imports: a fresh training worker must not pay for
DeepSpeed's Muon optimizer module, whose ``torch.compile`` decorators cost ~1.5 CPU-s
(``deepspeed_config.skip_muon_probe``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A fresh process: the test session may have imported the Muon module already.
BUILD_ENGINE = """
import json, sys, time
import torch
from melp_ray.config import PretrainConfig, load_config
from melp_ray.train.deepspeed_config import DEEPSPEED_MUON
from melp_ray.train.recipe import DeepSpeedRecipe
from melp_ray.train.session import single_process_group

class LinearRecipe(DeepSpeedRecipe):
    def build_model(self):
        return torch.nn.Linear(4, 2)

single_process_group()
recipe = LinearRecipe(load_config(PretrainConfig, "tiny", ["train.num_workers=1"]))
start = time.process_time()
recipe.build_engine()
print(json.dumps({"muon": sys.modules.get(DEEPSPEED_MUON) is not None,
                  "zero_stage": recipe.engine.zero_optimization_stage(),
                  "optimizer": type(recipe.engine.basic_optimizer).__name__,
                  "cpu_s": time.process_time() - start}))
"""


@pytest.mark.slow   # a DeepSpeed engine in a subprocess: a few seconds
def test_building_the_engine_does_not_import_deepspeeds_muon_optimizer():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", BUILD_ENGINE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    # ZeRO-2 around our AdamW, as in every run, and DeepSpeed's Muon module never imported.
    assert built["zero_stage"] == 2 and built["optimizer"] == "AdamW", built
    assert built["muon"] is False, built
