"""The front door: jobs/adapt.py end to end (subprocess driver on the session cluster), a rerun
that reuses everything, ray job submit, a 2-trial Tune search, and the API key kept secret."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, subset_manifest
from mifuse_ray.console import NATIVE_LOG_LINE

SECRET = "sk-mifuse-test-SECRET-4242"


def job_command(args, env_extra=None):
    """jobs/adapt.py with these arguments, and its environment (the LALM key set)."""
    env = {**os.environ, "MIFUSE_LALM_API_KEY": SECRET, **(env_extra or {})}
    return [sys.executable, os.path.join(REPO, "jobs", "adapt.py"), *args], env


def run_job(args, env_extra=None, timeout=900):
    command, env = job_command(args, env_extra)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def cached_answers(out: str) -> int:
    """LALM answers in a run's response cache (one object per paid answer)."""
    return sum(len(files) for _, _, files in os.walk(os.path.join(out, "lalm_cache")))


@pytest.fixture(scope="module")
def adapt_run(ray_cluster, source_model, demo_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("adapt"))
    target = subset_manifest(demo_root, "call_centre", str(tmp_path_factory.mktemp("clips") / "clips.parquet"),
                             per_split=48)
    args = ["--target", target, "--source.checkpoint",
            source_model, "--output", out, "--lalm.answers_per_clip", "3", "--source.passes_per_clip", "4", "--train.epochs", "2",
            "--train.online_fusion_from_epoch", "1", "--train.cpus_per_worker", "0.5", "--audio.train_crop_s", "1.0"]
    first = run_job(args)
    assert first.returncode == 0, first.stderr[-3000:]
    return out, args, first


def test_adapt_writes_every_artefact(adapt_run):
    out, _, proc = adapt_run
    assert "report:" in proc.stdout
    for rel in ("report.md", "results.json", "run.json", "labels/labels.parquet", "labels_dev/labels.parquet",
                "labels_test/labels.parquet", "confusion_matrices.png", "fusion.png", "training.png",
                "models/mifuse/student/mifuse_model.json", "models/mifuse/ema/model.safetensors"):
        assert os.path.exists(os.path.join(out, rel)), rel
    report = open(os.path.join(out, "report.md")).read()
    assert report.splitlines()[2].startswith("**Verdict:** the adapted model (`mifuse_ema`")   # the verdict opens it
    assert "the LALM (zero-shot)" in report and "95% CI" in report
    results = json.load(open(os.path.join(out, "results.json")))["results"]
    assert results["labeling"]["fusion"]["chosen"] and "predicted_classes" in results["labeling"]
    for system in ("mifuse_student", "mifuse_ema", "source_only", "lalm_zero_shot", "fused_label"):
        assert system in report
    # the test clips name a speaker with enough clips: every system is also scored speaker-normalised
    assert set(results["test_by_speaker"]) == set(results["test"])
    assert "With speaker-normalised inference" in report
    # choose on dev, score on test: the record says where each choice was made
    choices = {c["choice"]: c for c in json.load(open(os.path.join(out, "choices.json")))}
    assert choices == {c["choice"]: c for c in results["choices"]}
    fusion = choices["fusion"]
    assert fusion["value"] == results["labeling"]["fusion"]["chosen"] and fusion["made_on"] == "dev, first half"
    assert fusion["clips"] > 0 and 0 < fusion["score"]["fused_label_uar"] <= 1
    assert choices["mifuse student's final model"]["made_on"] == "nothing (the last epoch)"
    assert choices["test split"]["made_on"] == "test" and "## Choices: what was chosen on which split" in report
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["git_commit"] and run["packages"]["ray"] and run["manifest_sha256"] and run["lalm_endpoint"]
    assert run["config"]["lalm"]["api_key_env"] == "MIFUSE_LALM_API_KEY"
    assert os.listdir(os.path.join(out, "tensorboard", "mifuse"))
    # the student is a source-format checkpoint: it can seed a later adaptation
    from mifuse_ray.models.base import load_model
    assert load_model(os.path.join(out, "models", "mifuse", "ema")).labels == ["neutral", "happy", "angry", "sad"]


def test_predict_job_scores_clips_and_speakers(adapt_run, tmp_path):
    """jobs/predict.py on the adapted model: one row per test clip, and with --by-speaker the
    speaker-normalised prediction beside the per-clip one."""
    import pandas as pd
    out, args, _ = adapt_run
    preds = str(tmp_path / "preds.parquet")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "predict.py"), "--model",
                           os.path.join(out, "models", "mifuse", "ema"), "--input", args[args.index("--target") + 1],
                           "--split", "test", "--out", preds, "--by-speaker"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_parquet(preds)
    assert len(df) == 48 and df["pred"].notna().all() and df["pred_by_speaker"].notna().all()
    assert set(df["pred_by_speaker"]) <= {"neutral", "happy", "angry", "sad"}


def test_predict_by_speaker_without_speakers_is_one_line_before_any_model_runs(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.wav").write_bytes(b"not read: the check comes first")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "predict.py"), "--model", str(tmp_path / "none"),
                           "--input", str(tmp_path / "clips"), "--out", str(tmp_path / "p.parquet"), "--by-speaker"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: --by-speaker needs a speaker_id column in the manifest given to --input"


def test_console_is_short_and_ends_with_the_summary(adapt_run):
    """One line per stage, Ray's own logs in a file, and the summary table last."""
    out, _, proc = adapt_run
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) <= 40, proc.stdout
    assert lines[-1].startswith("report: ") and any(line.startswith("mifuse_ema") for line in lines[-7:])
    assert sum("done in" in line for line in lines) >= 5
    assert os.path.exists(os.path.join(out, "logs", "ray.log"))
    # Ray Data's plans went to that file, not to stderr (its logger has a console handler of its own)
    assert "Execution plan of Dataset" not in proc.stderr
    assert "Execution plan of Dataset" in open(os.path.join(out, "logs", "ray.log")).read()
    # nothing from Ray's C++ side either: the core worker's lines (one per Ray Data actor pool) go to that file
    native = [line for line in (proc.stdout + proc.stderr).splitlines() if NATIVE_LOG_LINE.match(line)
              or "core_worker" in line or "raylet" in line]
    assert not native, native
    assert "core_worker.cc" in open(os.path.join(out, "logs", "ray.log")).read()


def test_rerun_reuses_labels_answers_and_checkpoints(adapt_run):
    """A rerun of the same command pays for no answer and trains no student again."""
    out, args, _ = adapt_run
    model = os.path.join(out, "models", "mifuse", "ema", "model.safetensors")
    model_written, answers_before = os.stat(model).st_mtime_ns, cached_answers(out)
    assert answers_before > 0
    again = run_job(args)
    assert again.returncode == 0, again.stderr[-3000:]
    results = json.load(open(os.path.join(out, "results.json")))["results"]
    assert results["labeling"].get("reused") is True
    assert cached_answers(out) == answers_before                         # no new answer was asked for
    assert os.stat(model).st_mtime_ns == model_written                   # the student was not trained again


def test_api_key_never_written(adapt_run):
    out, _, proc = adapt_run
    assert SECRET not in proc.stdout + proc.stderr
    for root, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                assert SECRET.encode() not in fh.read(), os.path.join(root, name)


USER_ERRORS = [
    (["--source.checkpoint", "/nonexistent/model", "--target", "{target}"], "checkpoint not found"),
    (["--labels", "calm,joy,rage,grief", "--source.checkpoint", "{model}", "--target", "{target}"],
     "trained on labels"),
    (["--lalm.base_url", "http://127.0.0.1:9/v1", "--source.checkpoint", "{model}", "--target", "{target}"],
     "cannot reach the LALM endpoint"),
    (["--lalm.preset", "openai", "--lalm.allow_remote_audio", "true", "--lalm.api_key_env", "NO_SUCH_KEY",
      "--source.checkpoint", "{model}", "--target", "{target}"], "NO_SUCH_KEY"),
    (["--output", "/proc/not_writable"], "not writable"),
    (["--lalm.answers_per_clip", "0"], "lalm.answers_per_clip"),
    (["--no.such_key", "1"], "unrecognized arguments"),
]


@pytest.fixture(scope="module")
def user_error_runs(ray_cluster, source_model, demo_root, tmp_path_factory):
    """Every case's job at once: each is a driver that starts, meets the mistake and exits, so
    running them side by side costs one start-up instead of seven."""
    target = os.path.join(demo_root, "call_centre", "manifest.parquet")
    procs = []
    for args, _ in USER_ERRORS:
        out = tmp_path_factory.mktemp("user_error")
        args = [a.format(model=source_model, target=target) for a in args]
        if "--output" not in args:
            args += ["--output", str(out / "o")]
        command, env = job_command(args)
        procs.append((out, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)))
    runs = []
    for out, proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        runs.append((out, proc.returncode, stdout, stderr))
    return runs


@pytest.mark.parametrize("case", range(len(USER_ERRORS)), ids=[message for _, message in USER_ERRORS])
def test_user_errors_end_in_one_clear_message(user_error_runs, case):
    out, returncode, _, stderr = user_error_runs[case]
    assert returncode == 2, stderr[-2000:]
    assert USER_ERRORS[case][1] in stderr
    assert "Traceback" not in stderr
    assert not (out / "o" / "lalm_cache").exists()                 # nothing was sent


def test_every_user_error_is_found_before_the_first_request(ray_cluster, demo_root, tmp_path):
    """Mistakes that need the inputs or the cluster to see (not only the config) stop the run with
    one clear error while the endpoint's request counter is still 0: nothing was paid for."""
    import torch
    from mifuse_ray.config import MiFuseConfig
    from mifuse_ray.overrides import apply_overrides
    from mifuse_ray.demo.lalm_server import BackgroundServer, ServerConfig
    from mifuse_ray.models.cnn import LogMelCNN
    from mifuse_ray.pipeline import adapt
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "source")
    LogMelCNN().save(checkpoint)
    target = os.path.join(demo_root, "call_centre", "manifest.parquet")
    no_dev = str(tmp_path / "no_dev.parquet")
    full = pd.read_parquet(target)
    full["path"] = [os.path.join(os.path.dirname(target), p) for p in full["path"]]
    full[full["split"] != "dev"].to_parquet(no_dev)
    cases = [({"target": no_dev, "train.final_model": "smoothed_dev"}, "needs a labelled dev split"),
             ({"fusion.weighting": "fixed", "fusion.fixed_weights": [1.0]}, "fusion.fixed_weights needs 2"),
             ({"train.num_workers": 64}, "CPUs, but the cluster has"),
             ({"output": "s3://bucket/run"}, "is a URI"),
             ({"labels": ["calm", "joy", "rage", "grief"]}, "trained on labels")]
    with BackgroundServer(ServerConfig()) as server:
        for overrides, message in cases:
            cfg = apply_overrides(MiFuseConfig(), {"target": target, "source.checkpoint": checkpoint,
                                                   "lalm.base_url": server.url, "output": str(tmp_path / "o"),
                                                   **overrides})
            with pytest.raises(ValueError, match=message):
                adapt(cfg)
        assert server.stats["requests"] == 0


def test_dry_run_estimates_without_sending(ray_cluster, source_model, demo_root, tmp_path):
    proc = run_job(["--target", os.path.join(demo_root, "podcast", "manifest.parquet"), "--source.checkpoint",
                    source_model, "--output", str(tmp_path), "--lalm.dry_run", "true", "--lalm.usd_per_request",
                    "0.002"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    est = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])["dry_run"]
    assert est["requests"] == est["clips"] > 0 and est["estimated_usd"] == pytest.approx(0.002 * est["requests"])


def with_settings(args: list[str], settings: dict[str, str]) -> list[str]:
    """``args`` with the values of some of its ``--name value`` pairs replaced."""
    args = list(args)
    for name, value in settings.items():
        args[args.index(name) + 1] = value
    return args


def test_readme_job_submit_script_runs_the_demo_with_auth_on(ray_cluster, adapt_run, tmp_path):
    """The README's 'Run as a Ray job' recipe is scripts/submit_demo_job.sh, run here as written (on
    the session's cluster, token auth on, with small settings appended) down to report.md.

    It runs into a copy of the adapt run's output with that run's settings but one epoch: the job
    reuses the stored draws and trains, evaluates and reports again. (Labelling under `ray job submit`
    is test_reliability's API-key test; its ~25 s are not paid twice.)"""
    import shutil
    assert os.environ["RAY_AUTH_MODE"] == "token"
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "bash scripts/submit_demo_job.sh" in readme
    first_out, args, _ = adapt_run
    out = str(tmp_path / "job")
    shutil.copytree(first_out, out)
    proc = subprocess.run(
        ["bash", "scripts/submit_demo_job.sh", *with_settings(args, {"--output": out, "--train.epochs": "1"})],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "RAY_DASHBOARD": ray_cluster["dashboard"], "PATH": os.environ.get("PATH", "")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout
    results = json.load(open(os.path.join(out, "results.json")))["results"]
    assert results["labeling"].get("reused") is True                       # the draws came from the copy
    history = json.load(open(os.path.join(out, "models", "mifuse", "reuse.json")))["result"]["history"]
    assert [h["epoch"] for h in history] == [0]                            # and the student trained in the job
    assert os.path.exists(os.path.join(out, "report.md"))


def test_tune_trial_trains_what_adapt_trains(adapt_run, tmp_path):
    """jobs/tune.py goes through the adapt job's pipeline: a trial at the adapt run's settings fuses the
    same labels with the same dev-fitted fusion and trains the same student (the student's reuse
    fingerprint hashes its fused labels, fusion fit, settings and dev clips); another trial differs;
    best_config.json is a config file that reproduces the best trial's settings. The console shows one
    line per finished trial and the table, nothing from Ray's workers or Tune's status tables."""
    import yaml
    from mifuse_ray.cli import parse_config, parser
    from mifuse_ray.config import result_fields
    from mifuse_ray.reuse import STAMP
    from mifuse_ray.tune import trial_config
    out, args, _ = adapt_run
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"fusion.lalm_answers_used": ["grid", [0, 1]]}))   # 0 (all): the adapt run's
    answers_before = cached_answers(out)
    command, env = job_command(args)
    command[1] = os.path.join(REPO, "jobs", "tune.py")
    proc = subprocess.run(command + ["--space", str(space), "--num-samples", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    finished = [line for line in lines if line.startswith("trial ") and " finished after 2 epochs: final_dev_uar " in line]
    assert len(finished) == 2, proc.stdout
    assert len(lines) <= 16, proc.stdout                     # 3 stage lines, 2 trials, the table, where to go next
    assert not [line for line in lines if "pid=" in line or "Trial status" in line or NATIVE_LOG_LINE.match(line)]
    assert cached_answers(out) == answers_before          # the adapt run's draws: the search asked nothing
    table = pd.read_csv(os.path.join(out, "tune_results.csv"))
    assert len(table) == 2 and set(table["config/fusion.lalm_answers_used"]) == {0, 1}
    adapt_student = json.load(open(os.path.join(out, "models", "mifuse", STAMP)))["fingerprint"]
    # Tune stops a trial at its last report, before it copies a final model: what each trial trained is
    # the fingerprint its Ray Train run was started under
    stamps = os.path.join(out, "_ray_train", "stamps")
    trials = {name: json.load(open(os.path.join(stamps, name, STAMP)))["fingerprint"]
              for name in os.listdir(stamps) if name.startswith("trial_")}
    assert len(trials) == 2
    assert sorted(fp == adapt_student for fp in trials.values()) == [False, True]
    best = json.load(open(os.path.join(out, "best_trial.json")))
    assert best["value"] == max(table["final_dev_uar"])
    cfg, _ = parse_config(parser("adapt"), args)
    best_cfg, _ = parse_config(parser("adapt"), ["--config", os.path.join(out, "best_config.json")])
    assert result_fields(best_cfg) == result_fields(trial_config(cfg, best["trial"]))
