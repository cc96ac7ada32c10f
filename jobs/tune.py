"""Ray Tune search over N, K, α, τ, λ_div, lr (ASHA), reusing one labeling run's stored draws.

    python jobs/tune.py --num-samples 8 --space space.yaml
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
    from mifuse_ray.inputs import prepare
    from mifuse_ray.pipeline import check_lalm, label_or_reuse, lalm_endpoint
    from mifuse_ray.tune import DEFAULT_SPACE, largest_answers, run_tune
    space = DEFAULT_SPACE
    if args.space:
        with open(args.space) as fh:
            space = yaml.safe_load(fh)
    # Ask the LALM once, for the largest N any trial will use; likewise K.
    cfg.lalm.answers_per_clip = max(cfg.lalm.answers_per_clip, largest_answers(space, "fusion.lalm_answers_used", cfg.lalm.answers_per_clip))
    cfg.source.passes_per_clip = max(cfg.source.passes_per_clip, largest_answers(space, "fusion.source_passes_used", cfg.source.passes_per_clip))
    inputs = prepare(cfg)
    with lalm_endpoint(cfg) as url:
        check_lalm(cfg, url)
        labels = label_or_reuse(cfg, inputs.adapt_df, os.path.abspath(cfg.output), inputs.source_checkpoint, url)
    cfg.train.cpus_per_worker = min(cfg.train.cpus_per_worker, 0.5)
    table, best = run_tune(cfg, labels.table, inputs.dev_df, inputs.source_checkpoint, os.path.abspath(cfg.output),
                           space, args.num_samples, args.search_alg, args.max_concurrent)
    print(table.to_string(index=False))
    print(f"best: {best.config} -> {os.path.join(cfg.output, 'best_config.json')}")
    print(f"tensorboard --logdir {os.path.join(cfg.output, 'tensorboard')}")


if __name__ == "__main__":
    main(run)
