"""Cluster definitions parse, and their entrypoints and resources match the job's options."""
import os
import shlex

import yaml

from conftest import REPO
from mifuse_ray.config import MiFuseConfig
from mifuse_ray.overrides import apply_overrides, flatten

CLUSTERS = os.path.join(REPO, "clusters")


def load(name):
    with open(os.path.join(CLUSTERS, name)) as fh:
        return yaml.safe_load(fh)


def test_rayjob_entrypoint_and_gpu_workers():
    job = load("rayjob.yaml")
    assert job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/adapt.py"]
    cfg_path = argv[argv.index("--config") + 1].replace("/app/", "")
    assert os.path.exists(os.path.join(REPO, cfg_path))
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    cfg = apply_overrides(MiFuseConfig(), flatten(load("adapt_cluster.yaml")))
    assert int(limits["nvidia.com/gpu"]) >= 1 and cfg.train.use_gpu
    gpus = workers["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert cfg.train.num_workers <= gpus
    assert cfg.source.num_actors * cfg.source.num_gpus <= gpus
    assert cfg.train.cpus_per_worker <= int(limits["cpu"])
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_raycluster_and_launcher():
    rc = load("raycluster.yaml")
    assert rc["kind"] == "RayCluster" and rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    aws = load("aws.yaml")
    assert aws["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert aws["head_node_type"] == "head" and "gpu_worker" in aws["available_node_types"]
    assert any("constraints.txt" in c for c in aws["setup_commands"])


def test_no_secret_values_in_cluster_files():
    for name in os.listdir(CLUSTERS):
        text = open(os.path.join(CLUSTERS, name)).read()
        assert "sk-" not in text


def test_every_cluster_runs_with_token_auth():
    """The clusters are defined as users get Ray 2.59+: token authentication on, no token in the files."""
    assert load("rayjob.yaml")["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert load("raycluster.yaml")["spec"]["authOptions"] == {"mode": "token"}
    aws = load("aws.yaml")
    assert "~/.ray/auth_token" in aws["file_mounts"]
    assert all("RAY_AUTH_MODE=token ray start" in " ".join(aws[k]) for k in ("head_start_ray_commands",
                                                                           "worker_start_ray_commands"))
    for name in os.listdir(CLUSTERS):
        assert "RAY_AUTH_MODE=disabled" not in open(os.path.join(CLUSTERS, name)).read()


def test_example_configs_parse_and_say_how_to_run_them():
    """configs/: one YAML per use, each valid, its command in its header; the demo's is the defaults."""
    from mifuse_ray.config import result_fields
    from mifuse_ray.overrides import load_yaml
    examples = sorted(os.listdir(os.path.join(REPO, "configs")))
    assert {"demo.yaml", "vllm_qwen2_audio.yaml", "hosted_openai.yaml"} <= set(examples)
    for name in examples:
        path = os.path.join(REPO, "configs", name)
        header = [line for line in open(path) if line.startswith("#")]
        assert any(f"python jobs/adapt.py --config configs/{name}" in line for line in header), name
        cfg = apply_overrides(MiFuseConfig(), load_yaml(path))
        if name == "demo.yaml":
            assert result_fields(cfg) == result_fields(MiFuseConfig())
        elif name.startswith("whisper"):
            assert cfg.source_train.encoder != "cnn" and cfg.source.mc_scope == "head" and not cfg.train.augment
        else:
            assert cfg.lalm.preset != "offline" and cfg.lalm.allow_remote_audio and cfg.source.checkpoint
