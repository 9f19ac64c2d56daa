"""deploy/: the Kubernetes Indexed Job for `edpo prep` is valid against the Kubernetes schema
(kubernetes-validate, pinned in python/requirements-deploy.txt, schemas inside the package), its
worker count is its `completions`; the Slurm batch script hands its arguments to `edpo prep`
with one thread per CPU of the task. (`make slurm-check` runs the script on a real Slurm.)"""

import copy
import os
import stat
import subprocess

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT

JOB = ROOT / "deploy" / "k8s" / "prep-job.yaml"
SBATCH = ROOT / "deploy" / "slurm" / "prep.sbatch"
# The Kubernetes version the manifest is checked against: Indexed Jobs with
# backoffLimitPerIndex are GA from 1.33.
K8S_VERSION = "1.33.0"


def job() -> dict:
    docs = list(yaml.safe_load_all(JOB.read_text()))
    assert len(docs) == 1
    return docs[0]


def test_prep_job_validates_against_the_kubernetes_schema():
    kubernetes_validate.validate(job(), K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda j: j["spec"].update(completionMode=3),
        lambda j: j["spec"]["template"]["spec"]["containers"][0].update(volumeMount=[]),
    ],
    ids=["wrong-type", "unknown-field"],
)
def test_the_validator_refuses_a_broken_job(break_it):
    bad = copy.deepcopy(job())
    break_it(bad)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_every_pod_is_one_worker_of_completions():
    spec = job()["spec"]
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["EDPO_WORKERS"]) == spec["completions"]
    assert container["command"][-1] == "prep" and "--out" in container["args"]
    mounts = {m["name"] for m in container["volumeMounts"]}
    claims = {v["name"] for v in spec["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert mounts <= claims, "the output folder is on the shared volume"


def test_sbatch_script_passes_its_arguments_to_edpo_prep(tmp_path):
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    fake = tmp_path / "edpo"
    fake.write_text('#!/bin/sh\necho "$@"; echo "task=$SLURM_ARRAY_TASK_ID"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "EDPO": str(fake), "SLURM_CPUS_PER_TASK": "3", "SLURM_ARRAY_TASK_ID": "2"}
    out = subprocess.run(
        ["bash", str(SBATCH), "--model", "m", "--data", "d", "--out", "o"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out == ["--quiet --threads 3 prep --model m --data d --out o", "task=2"]
