"""Ray Tune search over N, K, α, τ, λ_div, lr (ASHA), reusing one labelling run's stored draws.

    python jobs/tune.py --num-samples 8 [--space space.yaml] [any adapt option]
    python jobs/adapt.py --config outputs/demo/best_config.json      # the best trial, as adapt trains it
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mifuse_ray.cli import main, parse_config, parser  # noqa: E402


def run() -> None:
    import yaml
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--search-alg", default="random", choices=["random", "optuna"])
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--space", help="YAML {dotted.name: [kind, values]}; kinds: choice, uniform, loguniform, grid")
    cfg, args = parse_config(p)
    from mifuse_ray.console import divert_native_logs, quiet_ray, stage
    from mifuse_ray.inputs import check_output_writable, prepare
    from mifuse_ray.pipeline import label_run, split_tables
    from mifuse_ray.tune import DEFAULT_SPACE, run_tune, searchable
    space = DEFAULT_SPACE
    if args.space:
        with open(args.space) as fh:
            space = yaml.safe_load(fh)
    cfg = searchable(cfg, space)
    check_output_writable(cfg.output)
    out = os.path.abspath(cfg.output)
    log_path = quiet_ray(os.path.join(out, "logs"), cfg.verbose)
    if log_path:
        divert_native_logs(log_path)
    with stage("inputs", 3, 1):
        inputs = prepare(cfg, verbose=cfg.verbose)
    with stage(f"labelling {inputs.clip_totals()[0]} clips with both teachers (once, for every trial)", 3, 2):
        split_labels, _ = label_run(cfg, inputs, out)
    cfg.train.cpus_per_worker = min(cfg.train.cpus_per_worker, 0.5)
    print(f"[3/3] {args.num_samples} trial(s) of the search, {args.max_concurrent} at a time:", flush=True)
    table, best = run_tune(cfg, split_tables(split_labels), inputs.dev_df,
                           inputs.source_checkpoint, out, space, args.num_samples, args.search_alg, args.max_concurrent)
    print(table.to_string(index=False))
    print(f"best: {best.config}\nrerun it as adapt does: python jobs/adapt.py --config {os.path.join(cfg.output, 'best_config.json')}")
    print(f"tensorboard --logdir {os.path.join(cfg.output, 'tensorboard')}")


if __name__ == "__main__":
    main(run)
